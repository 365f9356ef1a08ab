"""The kernels' parameter structs as the host lays them out (cupyflash/_csource.py reads them from
cuda_src/params.cuh and mask.cuh): the reader against hand-computed C layouts and its errors; every
offset and size against nvcc's host layout (no GPU needed) and, on the device, against NVRTC's; and a
struct passed by value arrives intact."""
import re
import shutil
import subprocess

import numpy as np
import pytest

from cupyflash import _csource

NAMES = ("VariantParams", "FwdParams", "BwdParams", "FwdParamsSm90", "DecodeParams", "BwdParamsSm90", "RowFlags",
         "NonfiniteParams", "SplitParams", "SinkGradParams", "TensorMap")
STRUCTS = {name: _csource.struct_dtype(_csource.source("params.cuh"), name) for name in NAMES}

SMALL = """
// struct Commented { a declaration the reader never sees };
struct Pair { int a, b; };  /* two ints */
struct Mixed {
    char c;                           // 7 bytes of padding follow
    double d;
    const unsigned char *p, *q;       // pointers of any type are 8 bytes
    Pair pairs[3];
    unsigned u;                       // the size rounds up to the alignment of d
};
struct __align__(64) Wide {
    unsigned long long words[2];
};
struct Holder { int n; Wide w; float f; };
"""


def _layout(dtype):
    return {name: (dtype.fields[name][1], dtype.fields[name][0].itemsize) for name in dtype.names}, dtype.itemsize


def test_reads_c_layouts():
    """Offsets, member sizes and struct sizes by C's rules: natural alignment, padding between members and
    at the end, arrays, nested structs and a 64-byte aligned one."""
    read = lambda name: _layout(_csource.struct_dtype(SMALL, name))  # noqa: E731
    assert read("Pair") == ({"a": (0, 4), "b": (4, 4)}, 8)
    assert read("Mixed") == ({"c": (0, 1), "d": (8, 8), "p": (16, 8), "q": (24, 8), "pairs": (32, 24),
                              "u": (56, 4)}, 64)
    assert read("Wide") == ({"words": (0, 16)}, 64)
    assert read("Holder") == ({"n": (0, 4), "w": (64, 64), "f": (128, 4)}, 192)
    assert _csource.struct_dtype(SMALL, "Mixed").fields["pairs"][0].shape == (3,)


@pytest.mark.parametrize("text, message", [
    ("struct S { size_t n; };", "struct S: unknown type `size_t` in `size_t n;`"),
    ("struct S { int a : 3; };", "struct S: cannot read the declaration `int a : 3;`"),
    ("struct S { int a[2][2]; };", "struct S: cannot read the declaration"),
    ("struct S { int a, int b; };", "struct S: cannot read the declaration `int a, int b;`"),
    ("struct S { int f() { return 0; } };", "struct S is not a plain list of members"),
    ("struct T { int a; };", "no struct S"),
], ids=["unknown type", "bit field", "2-d array", "second type", "member function", "no such struct"])
def test_unreadable_declarations_fail_clearly(text, message):
    with pytest.raises(ValueError, match=re.escape("cupyflash: " + message)):
        _csource.struct_dtype(text, "S")


def test_reads_enums_and_constants():
    text = "enum E : int { A = 1, B = 0x10 };  // enum E { ignored }\nconstexpr int ROWS = 16;"
    assert _csource.enum_values(text, "E") == {"A": 1, "B": 16}
    assert _csource.constant(text, "ROWS") == 16
    with pytest.raises(ValueError, match="enum F: cannot read `B`"):
        _csource.enum_values("enum F { A = 1, B };", "F")
    with pytest.raises(ValueError, match="constexpr int COLS"):
        _csource.constant(text, "COLS")


def test_feature_bits_are_distinct():
    """A kernel's FEATURES is a sum of distinct bits (cuda_src/mask.cuh, enum Feature)."""
    from cupyflash import _variants

    bits = list(_variants.FEATURES.values())
    assert bits and all(bit > 0 and bit & (bit - 1) == 0 for bit in bits) and len(set(bits)) == len(bits)


def test_a_window_bounds_the_left_only_where_it_has_a_left_bound():
    """Causal and right-only windows compile without the left bound's compare (WINDOW without WINDOW_LEFT)."""
    import numpy as np

    from cupyflash import _validate, _variants

    window, left = _variants.FEATURES["WINDOW"], _variants.FEATURES["WINDOW_LEFT"]
    q = np.zeros((1, 8, 2, 16), np.float32)
    for kw, want in [({}, 0), ({"causal": True}, window), ({"window_size": (-1, 3)}, window),
                     ({"window_size": (4, -1)}, window | left), ({"window_size": (4, 0)}, window | left),
                     ({"causal": True, "window_size": (0, -1)}, window | left)]:
        features, _, fields = _variants.kernel_variant(_validate.check_call("attention", q, q, q, **kw))
        assert features & (window | left) == want, kw
        assert fields["window_left"] == (kw.get("window_size", (-1, -1))[0]), kw


def _probes():
    return [(struct, name) for struct, dtype in STRUCTS.items() for name in dtype.names]


def _check_layouts(got):
    """got: (offset, member size, struct size) of each of _probes()."""
    for (struct, name), (offset, size, total) in zip(_probes(), got):
        field, want_offset = STRUCTS[struct].fields[name][:2]
        assert (offset, size, total) == (want_offset, field.itemsize, STRUCTS[struct].itemsize), (struct, name)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_layouts_match_the_host_compiler(tmp_path):
    """Each member's offset and size and each struct's size, as nvcc lays them out for the host (the
    device layout is the same by CUDA's rules; test_layouts_match_on_the_device checks it)."""
    prints = "\n".join(f'    std::printf("%zu %zu %zu\\n", offsetof({s}, {f}), sizeof((({s}*)nullptr)->{f}),'
                       f' sizeof({s}));' for s, f in _probes())
    (tmp_path / "layout.cu").write_text(_csource.source("params.cuh") + "\n#include <cstddef>\n#include <cstdio>\n"
                                        "int main() {\n" + prints + "\n}\n")
    subprocess.run(["nvcc", "-std=c++17", "-o", str(tmp_path / "layout"), str(tmp_path / "layout.cu")],
                   check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    _check_layouts([tuple(map(int, line.split())) for line in out.splitlines()])


@pytest.mark.gpu
def test_layouts_match_on_the_device():
    """Each member's offset and size and each struct's size, as the device compiler lays them out, for the
    dtypes the CUDA backend passes."""
    import cupy as cp

    from cupyflash import _cuda_backend, _tma

    backend = {"VariantParams": _cuda_backend.VARIANT_PARAMS, "FwdParams": _cuda_backend.FWD_PARAMS,
               "BwdParams": _cuda_backend.BWD_PARAMS, "FwdParamsSm90": _cuda_backend.FWD_PARAMS_SM90,
               "DecodeParams": _cuda_backend.DECODE_PARAMS, "BwdParamsSm90": _cuda_backend.BWD_PARAMS_SM90,
               "RowFlags": _cuda_backend.ROW_FLAGS, "NonfiniteParams": _cuda_backend.NONFINITE_PARAMS,
               "SplitParams": _cuda_backend.SPLIT_PARAMS, "SinkGradParams": _cuda_backend.SINK_GRAD_PARAMS,
               "TensorMap": _tma.TENSOR_MAP}
    assert backend == STRUCTS
    probes = _probes()
    body = "\n".join(f"    out[{3 * n}] = (unsigned long long)&((({s}*)nullptr)->{f});\n"
                     f"    out[{3 * n + 1}] = sizeof((({s}*)nullptr)->{f});\n    out[{3 * n + 2}] = sizeof({s});"
                     for n, (s, f) in enumerate(probes))
    code = _csource.source("params.cuh") + (
        'extern "C" __global__ void layout(unsigned long long* out) {\n' + body + "\n}\n")
    out = cp.zeros(3 * len(probes), cp.uint64)
    cp.RawModule(code=code, options=("-std=c++17",)).get_function("layout")((1,), (1,), (out,))
    _check_layouts(out.get().reshape(-1, 3).tolist())


@pytest.mark.gpu
def test_struct_reaches_the_device_intact():
    """A kernel copies each 8-byte word of a BwdParams it received by value back to memory."""
    import cupy as cp

    from cupyflash import _cuda_backend

    code = _csource.source("params.cuh") + """
extern "C" __global__ void echo(const __grid_constant__ BwdParams p, unsigned long long* out) {
    const unsigned long long* words = reinterpret_cast<const unsigned long long*>(&p);
    for (int i = threadIdx.x; i < sizeof(BwdParams) / 8; i += blockDim.x) out[i] = words[i];
}"""
    kernel = cp.RawModule(code=code, options=("-std=c++17",)).get_function("echo")
    params = np.zeros(1, _cuda_backend.BWD_PARAMS)
    raw = params.view(np.uint8)
    raw[:] = np.random.default_rng(0).integers(0, 256, raw.size, dtype=np.uint8)
    out = cp.zeros(_cuda_backend.BWD_PARAMS.itemsize // 8, cp.uint64)
    kernel((1,), (32,), (params, out))
    assert np.array_equal(out.get(), params.view(np.uint64))


def test_readdressed_struct_changes_only_its_pointer_members():
    """A parameter struct built once and given new addresses (the decode loop's) equals the struct built
    from scratch with those addresses."""
    pytest.importorskip("cupy", reason="cupy is not installed")
    from cupyflash import _cuda_backend

    values = np.zeros(1, _cuda_backend.DECODE_PARAMS)
    values["fwd"]["scale"], values["fwd"]["seqlen_k"], values["page_size"], values["num_splits"] = 0.125, 77, 256, 3
    addresses = [(n + 1) * 4096 for n in range(len(_cuda_backend._DECODE_ADDRESSES))]
    struct = _cuda_backend._Readdressed(_cuda_backend.DECODE_PARAMS, values[0].item(), _cuda_backend._DECODE_ADDRESSES)
    want = values.copy()
    for member, address in zip(_cuda_backend._DECODE_ADDRESSES, addresses):
        *outer, name = member.split(".")
        (want[outer[0]] if outer else want)[name] = address
    assert struct(addresses).words.tobytes() == want.tobytes()
    assert struct([0] * len(addresses)).words.tobytes() != want.tobytes()  # every pointer member rewritten
    assert struct(addresses).words.tobytes() == want.tobytes()


def test_readdressed_struct_is_a_copy_per_thread():
    """Each thread writes its own copy of a struct: one thread's call does not change another's struct
    before its launch."""
    pytest.importorskip("cupy", reason="cupy is not installed")
    import threading

    from cupyflash import _cuda_backend

    values = np.zeros(1, _cuda_backend.DECODE_PARAMS)
    struct = _cuda_backend._Readdressed(_cuda_backend.DECODE_PARAMS, values[0].item(), _cuda_backend._DECODE_ADDRESSES)
    mine = struct([4096] * len(_cuda_backend._DECODE_ADDRESSES))
    written = mine.words.tobytes()
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(struct([8192] * len(_cuda_backend._DECODE_ADDRESSES))))
    thread.start()
    thread.join()
    assert theirs[0].words is not mine.words
    assert mine.words.tobytes() == written != theirs[0].words.tobytes()


def test_readdressed_struct_takes_tensor_maps():
    """The Hopper forward's struct, planned once per call signature, gets each call's addresses and tensor
    maps (16 words each) in their members and nothing else."""
    pytest.importorskip("cupy", reason="cupy is not installed")
    from cupyflash import _cuda_backend

    dtype = _cuda_backend.FWD_PARAMS_SM90
    values = np.zeros(1, dtype)
    values["fwd"]["scale"], values["fwd"]["seqlen_q"], values["batch"] = 0.125, 77, 3
    members = tuple(f"fwd.{m}" for m in _cuda_backend._FWD_ADDRESSES)
    struct = _cuda_backend._Readdressed(dtype, values[0].item(), members, ("tma_q", "tma_k", "tma_v"))
    addresses = [(n + 1) * 4096 for n in range(len(members))]
    maps = [np.arange(16, dtype=np.uint64) + 100 * (n + 1) for n in range(3)]
    want = values.copy()
    for member, address in zip(_cuda_backend._FWD_ADDRESSES, addresses):
        want["fwd"][member] = address
    for name, words in zip(("tma_q", "tma_k", "tma_v"), maps):
        want[name] = np.frombuffer(words.tobytes(), want.dtype[name])
    assert struct(addresses, maps).words.tobytes() == want.tobytes()
