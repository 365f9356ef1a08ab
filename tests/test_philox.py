"""Dropout bits: Philox-4x32-7 (and the same round at 10) against Random123's known answers, the keep rule of
docs/variants.md written out one element at a time, tile independence, drop rates, argument
checks, the CUDA source compiled by NVRTC, and the GPU mask bit for bit against NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from cupyflash._philox import dropout_mask, keep, philox4x32, split_seed, threshold

# Random123's kat_vectors for philox4x32: rounds -> [(counter, key, output)]; 7 rounds are the dropout
# bits', 10 check the same round function further.
KNOWN_ANSWERS = {
    7: [((0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A))],
    10: [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
         ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
         ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
          (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))],
}

U32 = st.integers(0, 2**32 - 1)
SEEDS = st.integers(0, 2**64 - 1)


def philox_one(k0, k1, c0, c1, c2, c3, rounds=7):
    """Philox-4x32 on Python ints, the round of docs/variants.md as written."""
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) % 2**32, (k1 + 0xBB67AE85) % 2**32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 % 2**32, (p0 >> 32) ^ c3 ^ k1, p0 % 2**32
    return c0, c1, c2, c3


def keep_one(seed, p, b, h, i, j):
    """keep[b, h, i, j] of docs/variants.md on Python ints."""
    r = philox_one(seed % 2**32, seed >> 32, (j // 64) * 4 + (j % 8) // 2, i, h, b)
    u = [(w >> (8 * k)) & 0xFF for w in r for k in range(4)]
    return u[((j % 64) // 8) * 2 + j % 2] >= min(math.floor(p * 256 + 0.5), 255)


@pytest.mark.parametrize("rounds, counter, key, expected",
                         [(rounds, *answer) for rounds, answers in KNOWN_ANSWERS.items() for answer in answers])
def test_philox_known_answers(rounds, counter, key, expected):
    words = philox4x32(*key, *counter, rounds=rounds)
    assert all(w.dtype == np.uint32 for w in words)
    assert tuple(int(w) for w in words) == expected
    assert philox_one(*key, *counter, rounds=rounds) == expected


@given(st.lists(st.tuples(U32, U32, U32, U32, U32, U32), min_size=1, max_size=20))
def test_philox_is_elementwise_over_broadcast_arrays(rows):
    args = [np.array(col, dtype=np.uint32) for col in zip(*rows)]
    args[1] = args[1][:1]  # one k1 for all: broadcasting
    words = philox4x32(*args)
    for n, row in enumerate(rows):
        assert tuple(int(w[n]) for w in words) == philox_one(row[0], rows[0][1], *row[2:])


@given(SEEDS, st.floats(0.0, 0.999), st.integers(0, 5), st.integers(0, 70), st.integers(0, 2**20),
       st.integers(0, 2**24))
def test_keep_follows_the_written_rule(seed, p, b, h, i, j):
    assert bool(keep(seed, p, b, h, i, j)) == keep_one(seed, p, b, h, i, j)


@given(SEEDS, st.floats(0.05, 0.95), st.data())
def test_dropout_mask_is_the_same_for_any_tile(seed, p, data):
    """Bits depend on (seed, b, h, i, j) only: not on the shape asked for, nor on a tile's corner."""
    shape = (2, 3, 37, 70)
    mask = dropout_mask(shape, p, seed)
    assert mask.shape == shape and mask.dtype == bool
    i0 = data.draw(st.integers(0, 36))
    i1 = data.draw(st.integers(i0 + 1, 37))
    j0 = data.draw(st.integers(0, 69))
    j1 = data.draw(st.integers(j0 + 1, 70))
    b = np.arange(2)[:, None, None, None]
    h = np.arange(3)[:, None, None]
    tile = keep(seed, p, b, h, np.arange(i0, i1)[:, None], np.arange(j0, j1))
    np.testing.assert_array_equal(tile, mask[:, :, i0:i1, j0:j1])
    np.testing.assert_array_equal(dropout_mask((1, 2, i1, j1), p, seed), mask[:1, :2, :i1, :j1])
    bi, hi, i, j = (data.draw(st.integers(0, n - 1)) for n in shape)
    assert mask[bi, hi, i, j] == keep_one(seed, p, bi, hi, i, j)


@pytest.mark.parametrize("p", [0.1, 0.25, 1 / 3, 0.5, 0.9])
def test_dropped_fraction_is_binomial(p):
    """Overall and at each of the 64 column positions of a group (each byte of each word)."""
    mask = dropout_mask((2, 4, 64, 256), p, 20240601)
    q = threshold(p) / 256
    for dropped, n in ((1 - mask.mean(), mask.size),
                       *((1 - mask[..., c::64].mean(), mask[..., c::64].size) for c in range(64))):
        assert abs(dropped - q) <= 5 * math.sqrt(q * (1 - q) / n), (p, dropped, q)


def test_p_zero_keeps_everything():
    assert threshold(0.0) == 0
    assert dropout_mask((2, 3, 9, 40), 0.0, 123).all()
    assert dropout_mask((2, 3, 9, 40), 0.0, 2**64 - 1).all()


@pytest.mark.parametrize("p, t", [
    (0.0, 0), (0.49 / 256, 0), (0.5 / 256, 1), (1.49 / 256, 1), (1.5 / 256, 2), (0.25, 64),
    (0.5, 128), (254.5 / 256, 255), (255.4 / 256, 255), (255.6 / 256, 255),
    (np.nextafter(1.0, 0.0), 255), (np.float32(0.5), 128),
])
def test_threshold_rounds_to_nearest_and_stays_below_256(p, t):
    assert threshold(p) == t


def test_threshold_decides_the_bit():
    """p = 1.5/256 drops u in {0, 1}: the mask differs from p = 0.5/256 exactly where u == 1."""
    shape = (2, 4, 64, 256)
    low, high = dropout_mask(shape, 0.5 / 256, 7), dropout_mask(shape, 1.5 / 256, 7)
    assert not (high & ~low).any()
    b, h, i, j = (int(x[0]) for x in np.nonzero(low & ~high))
    assert keep_one(7, 0.5 / 256, b, h, i, j) and not keep_one(7, 1.5 / 256, b, h, i, j)


def test_seed_is_split_low_then_high():
    assert split_seed(0x0123456789ABCDEF) == (0x89ABCDEF, 0x01234567)
    assert split_seed(2**64 - 1) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert all(isinstance(x, np.uint32) for x in split_seed(5))
    shape = (1, 2, 16, 64)
    base = dropout_mask(shape, 0.5, 5)
    assert (dropout_mask(shape, 0.5, 5 + 2**32) != base).any()  # the high half matters
    np.testing.assert_array_equal(dropout_mask(shape, np.float64(0.5), np.uint64(5)), base)


@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (1, 1, 1, 0), (1, 1, 0, 5)])
def test_empty_shapes(shape):
    mask = dropout_mask(shape, 0.3, 1)
    assert mask.shape == shape and mask.dtype == bool


BAD_ARGUMENTS = [
    (dict(shape=(2, 3, 4)), ValueError,
     "dropout_mask: shape must be 4 non-negative ints (batch, nheads, seqlen_q, seqlen_k), got (2, 3, 4)"),
    (dict(shape=(1, 1, -1, 2)), ValueError, "dropout_mask: shape must be 4 non-negative ints"),
    (dict(shape=(1, 1, 2.0, 2)), ValueError, "dropout_mask: shape must be 4 non-negative ints"),
    (dict(shape=(True, 1, 1, 1)), ValueError, "dropout_mask: shape must be 4 non-negative ints"),
    (dict(shape="abcd"), ValueError, "dropout_mask: shape must be 4 non-negative ints"),
    (dict(dropout_p=1.5), ValueError, "dropout_mask: dropout_p must be in [0, 1), got 1.5"),
    (dict(dropout_p=1.0), ValueError, "dropout_mask: dropout_p must be in [0, 1), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, "dropout_mask: dropout_p must be in [0, 1), got -0.1"),
    (dict(dropout_p=float("nan")), ValueError, "dropout_mask: dropout_p must be in [0, 1), got nan"),
    (dict(dropout_p="0.1"), TypeError, "dropout_mask: dropout_p must be a real number in [0, 1), got '0.1'"),
    (dict(dropout_p=True), TypeError, "dropout_mask: dropout_p must be a real number in [0, 1), got True"),
    (dict(dropout_p=None), TypeError, "dropout_mask: dropout_p must be a real number in [0, 1), got None"),
    (dict(seed=-1), ValueError, "dropout_mask: seed must be an int in [0, 2**64), got -1"),
    (dict(seed=2**64), ValueError, f"dropout_mask: seed must be an int in [0, 2**64), got {2**64}"),
    (dict(seed=1.0), TypeError, "dropout_mask: seed must be an int in [0, 2**64), got 1.0"),
    (dict(seed=True), TypeError, "dropout_mask: seed must be an int in [0, 2**64), got True"),
    (dict(seed=None), TypeError, "dropout_mask: seed must be an int in [0, 2**64), got None"),
    (dict(xp="numpy"), TypeError, "dropout_mask: xp must be the numpy or cupy module, got 'numpy'"),
    (dict(xp=math), TypeError, "dropout_mask: xp must be the numpy or cupy module, got <module 'math'"),
]


@pytest.mark.parametrize("bad, exc, message", BAD_ARGUMENTS)
def test_bad_arguments_are_named(bad, exc, message):
    # A huge shape: an argument error must come before any work.
    kw = dict(shape=(2**20,) * 4, dropout_p=0.1, seed=3, xp=np)
    kw.update(bad)
    with pytest.raises(exc) as info:
        dropout_mask(kw.pop("shape"), kw.pop("dropout_p"), kw.pop("seed"), **kw)
    assert str(info.value).startswith(message)


# --- CUDA --------------------------------------------------------------------------------------

PROBE = """
__global__ void philox_probe(const unsigned* in, unsigned* words, unsigned char* bits, int n, unsigned threshold) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const unsigned* a = in + 6 * t;
    unsigned r[4];
    philox4x32(a[0], a[1], a[2], a[3], a[4], a[5], r);
    for (int w = 0; w < 4; ++w) words[4 * t + w] = r[w];
    for (int j = 0; j < 64; ++j) bits[64 * t + j] = dropout_keep_bit(r, j, threshold);
}
"""


def _probe_source():
    from cupyflash import _cuda_backend

    return _cuda_backend.source("philox.cuh") + PROBE


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source, name", [("dropout_mask.cu", "dropout_mask_kernel"), ("probe", "philox_probe")])
def test_cuda_sources_compile_without_warnings(source, name, arch):
    """dropout_mask.cu, and philox.cuh on its own, compile with NVRTC (no GPU needed) and include
    no CUDA header (NVRTC from pip ships none)."""
    pytest.importorskip("cupy", reason="cupy is not installed")
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from cupyflash import _cuda_backend, _plan

    code = _probe_source() if source == "probe" else _cuda_backend.source(source)
    assert "#include" not in code
    program = nvrtc.createProgram(code, source, [], [])
    nvrtc.addNameExpression(program, name)
    try:
        nvrtc.compileProgram(program, [*_plan.OPTIONS, f"-arch={arch}"])
    except nvrtc.NVRTCError:
        pytest.fail(f"{source} for {arch}:\n{nvrtc.getProgramLog(program)}")
    log = nvrtc.getProgramLog(program).strip("\x00").strip()
    assert "warning" not in log.lower(), log
    assert nvrtc.getLoweredName(program, name)
    assert len(nvrtc.getCUBIN(program)) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 3, 37, 70), (1, 1, 1, 1), (1, 2, 5, 33), (3, 1, 17, 32), (1, 1, 2, 257)])
@pytest.mark.parametrize("p, seed", [(0.1, 0), (0.5, 2**64 - 1), (0.9, 0x0123456789ABCDEF), (1.5 / 256, 42)])
def test_gpu_mask_equals_numpy_bit_for_bit(shape, p, seed):
    import cupy

    got = dropout_mask(shape, p, seed, xp=cupy)
    assert isinstance(got, cupy.ndarray) and got.dtype == bool and got.shape == shape
    np.testing.assert_array_equal(got.get(), dropout_mask(shape, p, seed))


@pytest.mark.gpu
def test_gpu_mask_of_empty_shape():
    import cupy

    got = dropout_mask((2, 0, 3, 4), 0.3, 1, xp=cupy)
    assert isinstance(got, cupy.ndarray) and got.shape == (2, 0, 3, 4)


@pytest.mark.gpu
def test_gpu_philox_words_and_keep_bits_equal_numpy():
    """The device functions the attention kernels call, on the known answers and random inputs."""
    import cupy

    rng = np.random.default_rng(0)
    rows = [(*key, *ctr) for ctr, key, _ in KNOWN_ANSWERS[7]]
    args = np.concatenate([np.array(rows, np.uint32), rng.integers(0, 2**32, (1000, 6)).astype(np.uint32)])
    n, t = len(args), threshold(0.3)
    from cupyflash import _plan

    kernel = cupy.RawModule(code=_probe_source(), options=_plan.OPTIONS,
                            name_expressions=("philox_probe",)).get_function("philox_probe")
    words, bits = cupy.empty((n, 4), cupy.uint32), cupy.empty((n, 64), cupy.bool_)
    kernel(((n + 127) // 128,), (128,), (cupy.asarray(args), words, bits, np.int32(n), np.uint32(t)))
    want = np.stack(philox4x32(*args.T), axis=-1)
    np.testing.assert_array_equal(words.get(), want)
    byte = (np.arange(64) // 8) * 2 + np.arange(64) % 2
    u = (want[:, byte // 4] >> (8 * (byte % 4)).astype(np.uint32)) & 0xFF
    np.testing.assert_array_equal(bits.get(), u >= t)
    assert [tuple(int(w) for w in row) for row in want[:3]] == [expected for *_, expected in KNOWN_ANSWERS[7]]
