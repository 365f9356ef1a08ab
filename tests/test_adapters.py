"""cupyflash.torch and cupyflash.jax on the CPU (NumPy backend) and, marked gpu, on a CUDA device.

The expected values come from ``_reference``: docs/variants.md on the full score matrix in
float64, written in torch, whose autograd gives the expected gradients (the mask's too). On the
GPU, torch's ``scaled_dot_product_attention`` on the same low-precision inputs is the yardstick:
cupyflash's error against the float64 reference may be at most twice SDPA's (plus a floor).
Tests skip when torch or jax is missing.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import cupyflash

# XLA takes 75% of a GPU's memory up front by default, which CuPy's and torch's pools then lack.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ft(torch):
    import cupyflash.torch as ft

    return ft


@pytest.fixture(scope="module")
def cuda(torch):
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def jax():
    return pytest.importorskip("jax")


@pytest.fixture(scope="module")
def fj(jax):
    import cupyflash.jax as fj

    return fj


def _reference(torch, q, k, v, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
               attn_mask=None, layout="bshd"):
    """(out, lse) of docs/variants.md in float64 on the full score matrix, differentiable by autograd."""
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k, v = (x.double() for x in (q, k, v))
    _, h, sq, d = q.shape
    sk = k.shape[2]
    k, v = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (k, v))
    s = (q @ k.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)  # bottom-right aligned
    j = torch.arange(sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        s = s - alibi_slopes.double().reshape(-1, h, 1, 1) * (i - j).abs()
    left, right = window_size[0], 0 if causal else window_size[1]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible = visible & (j >= i - left)
    if right >= 0:
        visible = visible & (j <= i + right)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask.double()
    s = s.masked_fill(~visible, float("-inf"))
    out = torch.softmax(s, dim=-1) @ v
    return (out.transpose(1, 2) if layout == "bshd" else out), torch.logsumexp(s, dim=-1)


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def _rel_err(a, ref):
    return _max_err(a, ref) / max(ref.double().abs().max().item(), 1e-30)


def _inputs(torch, shape_q, shape_kv, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()
            for s in (shape_q, shape_kv, shape_kv)]


def _bool_mask(torch, shape, sq, sk, seed=1):
    """A random bool mask that keeps every bottom-right diagonal entry, so no row is empty."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.rand(shape, generator=g) > 0.4
    return keep | (torch.arange(sk)[None, :] == torch.arange(sq)[:, None] + (sk - sq))


def _grads(torch, out, inputs, dout):
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad(out, wanted, dout)


# --------------------------------------------------------------------------- without torch or jax

@pytest.mark.parametrize("module, hint", [("torch", "pip install torch"), ("jax", "pip install -U jax")])
def test_missing_framework_says_how_to_install(module, hint):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"try:\n    import cupyflash.{module}\nexcept ImportError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and hint in proc.stdout, proc.stdout + proc.stderr


def test_import_cupyflash_imports_no_framework():
    code = "import sys, cupyflash; print(sorted({'torch', 'jax'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# --------------------------------------------------------------------------- torch, CPU tensors

CPU_CASES = {
    "plain-gqa": dict(shape=(2, 24, 4, 16), kv=(40, 2), kw={}),
    "variants-bhsd": dict(shape=(2, 4, 33, 16), kv=(2, 33), layout="bhsd",
                          kw=dict(causal=True, window_size=(7, -1), softcap=4.0, scale=0.3), alibi=(4,),
                          mask="float"),
    "bool-mask-alibi": dict(shape=(2, 20, 4, 8), kv=(30, 4), kw={}, alibi=(2, 4), mask="bool"),
    "float-mask-window": dict(shape=(1, 17, 2, 8), kv=(21, 1), kw=dict(window_size=(3, 2)), mask="float"),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_torch_cpu_matches_reference(torch, ft, case):
    c = CPU_CASES[case]
    layout = c.get("layout", "bshd")
    b, sq, h, d = c["shape"] if layout == "bshd" else (c["shape"][0], c["shape"][2], c["shape"][1], c["shape"][3])
    sk, hk = c["kv"] if layout == "bshd" else c["kv"][::-1]
    kv_shape = (b, sk, hk, d) if layout == "bshd" else (b, hk, sk, d)
    q, k, v = _inputs(torch, c["shape"], kv_shape, torch.float32)
    kw = dict(c["kw"], layout=layout)
    if "alibi" in c:
        kw["alibi_slopes"] = torch.rand(c["alibi"], generator=torch.Generator().manual_seed(2)) * 0.3
    if c.get("mask") == "bool":
        kw["attn_mask"] = _bool_mask(torch, (b, 1, sq, sk), sq, sk)
    elif c.get("mask") == "float":
        kw["attn_mask"] = torch.randn(h, sq, sk, generator=torch.Generator().manual_seed(3)).requires_grad_()
    dout = torch.randn_like(q)

    out, lse = ft.attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = _reference(torch, q, k, v, **kw)
    inputs = (q, k, v, kw.get("attn_mask"))
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (b, h, sq) and not lse.requires_grad
    assert _rel_err(out, ref_out) < 1e-5 and _rel_err(lse, ref_lse) < 1e-5
    for got, want in zip(_grads(torch, out, inputs, dout), _grads(torch, ref_out, inputs, dout)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _rel_err(got, want) < 1e-4


@pytest.mark.parametrize("dtype_name, tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_torch_cpu_half_precision(torch, ft, dtype_name, tol):
    dtype = getattr(torch, dtype_name)
    q, k, v = _inputs(torch, (2, 32, 2, 16), (2, 48, 1, 16), dtype)
    dout = torch.randn_like(q)
    out = ft.attention(q, k, v, causal=True)
    ref = _reference(torch, q, k, v, causal=True)[0]
    assert out.dtype == dtype and _rel_err(out, ref) < tol
    for got, want in zip(_grads(torch, out, (q, k, v), dout), _grads(torch, ref, (q, k, v), dout)):
        assert got.dtype == dtype and _rel_err(got, want) < 4 * tol


# Few cases, each one kernel instantiation on the GPU (compiled at first use): the variants together.
GRADCHECK_CASES = {
    "mask": dict(),
    "softcap-alibi-window-dropout": dict(causal=True, softcap=2.0, window_size=(4, -1), dropout_p=0.3,
                                         dropout_seed=1234),
    "gqa-bhsd": dict(layout="bhsd"),
    "sink-causal": dict(causal=True),
}


def _gradcheck(torch, ft, device, case):
    kw = dict(GRADCHECK_CASES[case])
    bhsd = kw.get("layout") == "bhsd"
    b, sq, sk, h, hk, d = 1, 6, 9, 4, (2 if bhsd else 4), 8
    q, k, v = _inputs(torch, (b, h, sq, d) if bhsd else (b, sq, h, d),
                      (b, hk, sk, d) if bhsd else (b, sk, hk, d), torch.float64, device)
    mask = torch.randn(1, h, sq, sk, dtype=torch.float64, device=device, requires_grad=True)
    if "alibi" in case:
        kw["alibi_slopes"] = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    if "sink" not in case:
        assert torch.autograd.gradcheck(lambda q, k, v, mask: ft.attention(q, k, v, attn_mask=mask, **kw),
                                        (q, k, v, mask))
        return
    sink = torch.tensor([1.0, -0.5, 2.0, -3.0], dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, mask, sink: ft.attention(q, k, v, attn_mask=mask, learnable_sink=sink, **kw),
        (q, k, v, mask, sink))


def test_torch_cpu_sink_of_any_float_dtype(torch, ft):
    """A bfloat16 sink parameter beside float32 inputs: cast to float32 for the kernels, its gradient back in
    bfloat16, that of the float32 sink rounded."""
    q, k, v = _inputs(torch, (1, 9, 2, 8), (1, 9, 2, 8), torch.float32)
    sinks = [torch.tensor([0.5, -1.0], dtype=dtype, requires_grad=True) for dtype in (torch.bfloat16, torch.float32)]
    grads = [torch.autograd.grad(ft.attention(q, k, v, causal=True, learnable_sink=s).sum(), s)[0] for s in sinks]
    assert grads[0].dtype == torch.bfloat16 and torch.equal(grads[0], grads[1].to(torch.bfloat16))


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_torch_cpu_gradcheck(torch, ft, case):
    _gradcheck(torch, ft, "cpu", case)


def _dropout_checks(torch, ft, device):
    q, k, v = _inputs(torch, (2, 40, 2, 16), (2, 40, 2, 16), torch.float32, device)
    torch.manual_seed(7)
    first = ft.attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(7)
    again = ft.attention(q, k, v, dropout_p=0.4)
    other = ft.attention(q, k, v, dropout_p=0.4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # out is linear in v, so <dout, out> = <dv, v> exactly when the backward drops what the forward dropped.
    dout = torch.randn_like(first)
    (dv,) = torch.autograd.grad(first, (v,), dout)
    lhs, rhs = (dout.double() * first.double()).sum().item(), (dv.double() * v.double()).sum().item()
    assert abs(lhs - rhs) <= 1e-4 * (abs(lhs) + 1.0)


def test_torch_cpu_dropout_seed_drawn_and_replayed(torch, ft):
    _dropout_checks(torch, ft, "cpu")


def test_torch_cpu_grad_only_where_asked(torch, ft):
    q, k, v = _inputs(torch, (1, 8, 2, 8), (1, 8, 2, 8), torch.float32)
    q.requires_grad_(False)
    k.requires_grad_(False)
    bias = torch.zeros(8, 8)  # a float mask that does not require grad
    out = ft.attention(q, k, v, attn_mask=bias)
    out.sum().backward()  # dout with zero strides everywhere
    assert q.grad is None and k.grad is None and v.grad is not None and bias.grad is None
    with torch.no_grad():
        assert not ft.attention(q, k, v).requires_grad


def test_torch_compile_runs_it_eagerly(torch, ft):
    q, k, v = _inputs(torch, (1, 16, 2, 8), (1, 16, 2, 8), torch.float32)

    def loss(q, k, v):
        return (ft.attention(q * 2, k, v, causal=True) + 1).square().sum()

    compiled = torch.compile(loss, backend="eager")  # Dynamo, without a code generator: quick
    expected = torch.autograd.grad(loss(q, k, v), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v)), expected))


def test_torch_errors(torch, ft):
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(TypeError, match=r"cupyflash.torch.attention: q must be a torch.Tensor, got numpy.ndarray"):
        ft.attention(q.numpy(), q, q)
    with pytest.raises(TypeError, match=r"k.dtype must be float16, bfloat16, float32 or float64"):
        ft.attention(q, q.int(), q)
    with pytest.raises(TypeError, match=r"attn_mask.dtype must be .* or bool"):
        ft.attention(q, q, q, attn_mask=torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"v.device must equal q.device=cpu, got meta"):
        ft.attention(q, q, q.to("meta"))
    with pytest.raises(ValueError, match=r"q.device must be a CUDA device or the CPU"):
        ft.attention(*(x.to("meta") for x in (q, q, q)))
    with pytest.raises(TypeError, match=r"deterministic must be a bool"):
        ft.attention(q, q, q, deterministic="yes")
    with pytest.raises(ValueError, match=r"attention: k.shape\[2\] \(nheads_kv\) must divide"):  # the core's check
        ft.attention(q, torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8))


# --------------------------------------------------------------------------- jax, CPU arrays

def test_jax_cpu_grads_jit_vmap(jax, fj):
    jnp = jax.numpy
    from jax.test_util import check_grads

    rng = np.random.default_rng(0)
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        q = jnp.asarray(rng.standard_normal((2, 10, 4, 8)))
        k, v = (jnp.asarray(rng.standard_normal((2, 12, 2, 8))) for _ in range(2))
        mask = jnp.asarray(rng.standard_normal((4, 10, 12)))
        slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
        sink = jnp.asarray([1.0, -0.5, 2.0, -3.0])
        kw = dict(causal=True, softcap=3.0, window_size=(5, -1), alibi_slopes=slopes)

        out, lse = fj.attention(q, k, v, attn_mask=mask, learnable_sink=sink, return_lse=True, **kw)
        host = [np.asarray(x) for x in (q, k, v, mask, slopes, sink)]
        ref_out, ref_lse = cupyflash.reference.attention(*host[:3], attn_mask=host[3], learnable_sink=host[5],
                                                         return_lse=True, **dict(kw, alibi_slopes=host[4]))
        assert float(jnp.abs(out - ref_out).max()) < 1e-12 and float(jnp.abs(lse - ref_lse).max()) < 1e-12

        check_grads(lambda q, k, v, m, s: fj.attention(q, k, v, attn_mask=m, learnable_sink=s, **kw),
                    (q, k, v, mask, sink), order=1, modes=["rev"])

        def loss(q, k, v, m):
            return (fj.attention(q, k, v, attn_mask=m, **kw) ** 2).sum()

        eager = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, mask)
        jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, mask)
        assert all(bool((a == b).all()) for a, b in zip(eager, jitted))

        stacked = jax.vmap(lambda q: fj.attention(q, k, v))(jnp.stack([q, 2 * q]))
        assert bool((stacked[1] == fj.attention(2 * q, k, v)).all())


def test_jax_cpu_dtypes_seed_and_errors(jax, fj):
    with jax.default_device(jax.devices("cpu")[0]):
        _jax_dtypes_seed_and_errors(jax, fj)


def _jax_dtypes_seed_and_errors(jax, fj):
    jnp = jax.numpy
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 4, 16, 8)), jnp.bfloat16)  # bhsd
    out, lse = fj.attention(q, q, q, layout="bhsd", return_lse=True)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape and lse.dtype == jnp.float32 and lse.shape == (1, 4, 16)

    x = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
    step = jax.jit(lambda x, seed: fj.attention(x, x, x, dropout_p=0.5, dropout_seed=seed))
    a, b, c = step(x, jnp.uint32(3)), step(x, jnp.uint32(3)), step(x, jnp.uint32(4))
    assert bool((a == b).all()) and not bool((a == c).all())
    assert bool((a == fj.attention(x, x, x, dropout_p=0.5, dropout_seed=3)).all())  # traced or static: one seed
    # a bfloat16 sink beside float32 inputs: cast to float32 in the trace, its gradient back in bfloat16
    sink = jnp.asarray([0.5, -1.0], jnp.bfloat16)
    assert jax.grad(lambda s: fj.attention(x, x, x, causal=True, learnable_sink=s).sum())(sink).dtype == jnp.bfloat16

    with pytest.raises(ValueError, match=r"cupyflash.jax.attention: dropout_seed must be given"):
        fj.attention(x, x, x, dropout_p=0.1)
    with pytest.raises(TypeError, match=r"dropout_seed must be an int or an integer JAX scalar"):
        fj.attention(x, x, x, dropout_p=0.1, dropout_seed=jnp.float32(1))
    with pytest.raises(ValueError, match=r"nheads_kv"):
        jax.jit(lambda x, y: fj.attention(x, y, y))(x, jnp.zeros((1, 16, 3, 8)))


# --------------------------------------------------------------------------- torch, CUDA tensors

# Floors of the relative error, so that an SDPA error near 0 does not demand the impossible.
FLOOR = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 2e-5}


def _check_against_sdpa(torch, ours, sdpa, refs, dtype_name):
    for name, a, s, r in zip(("out", "dq", "dk", "dv", "dmask"), ours, sdpa, refs):
        ours_err, sdpa_err = _rel_err(a, r), _rel_err(s, r)
        assert ours_err <= 2 * sdpa_err + FLOOR[dtype_name], f"{name}: ours {ours_err:.2e}, SDPA {sdpa_err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_torch_gpu_vs_sdpa(torch, ft, cuda, dtype_name, causal):
    dtype = getattr(torch, dtype_name)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = _inputs(torch, (2, 4, 256, 64), (2, 4, 256, 64), dtype, cuda)  # bhsd, SDPA's layout
    dout = torch.randn_like(q)
    ours = ft.attention(q, k, v, causal=causal, layout="bhsd")
    theirs = sdpa(q, k, v, is_causal=causal)
    ref = _reference(torch, q, k, v, causal=causal, layout="bhsd")[0]
    results = [[out, *_grads(torch, out, (q, k, v), dout)] for out in (ours, theirs, ref)]
    _check_against_sdpa(torch, *results, dtype_name)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["bool-mask", "float-mask", "gqa-bottom-right-causal"])
def test_torch_gpu_masks_gqa_vs_sdpa(torch, ft, cuda, case):
    dtype = torch.float16 if case != "gqa-bottom-right-causal" else torch.bfloat16
    sdpa = torch.nn.functional.scaled_dot_product_attention
    b, h, sq, sk, d = 2, 4, 128, 192, 64
    hk = 2 if case.startswith("gqa") else h
    q, k, v = _inputs(torch, (b, h, sq, d), (b, hk, sk, d), dtype, cuda)
    dout = torch.randn_like(q)
    if case == "bool-mask":
        ours_kw = dict(attn_mask=_bool_mask(torch, (b, 1, sq, sk), sq, sk).to(cuda))
        sdpa_kw = dict(ours_kw)
    elif case == "float-mask":
        ours_kw = dict(attn_mask=torch.randn(1, h, sq, sk, device=cuda, dtype=dtype).requires_grad_())
        sdpa_kw = dict(ours_kw)
    else:  # SDPA's is_causal is top-left aligned: bottom-right causal is an explicit mask there
        ours_kw = dict(causal=True)
        sdpa_kw = dict(attn_mask=torch.ones(sq, sk, dtype=torch.bool, device=cuda).tril(sk - sq), enable_gqa=True)
    ours = ft.attention(q, k, v, layout="bhsd", **ours_kw)
    theirs = sdpa(q, k, v, **sdpa_kw)
    ref = _reference(torch, q, k, v, layout="bhsd", **ours_kw)[0]
    inputs = (q, k, v, ours_kw.get("attn_mask"))
    results = [[out, *_grads(torch, out, inputs, dout)] for out in (ours, theirs, ref)]
    _check_against_sdpa(torch, *results, "float16" if dtype == torch.float16 else "bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_torch_gpu_gradcheck(torch, ft, cuda, case):
    _gradcheck(torch, ft, cuda, case)


@pytest.mark.gpu
def test_torch_gpu_dropout_seed_drawn_and_replayed(torch, ft, cuda):
    _dropout_checks(torch, ft, cuda)


@pytest.mark.gpu
def test_torch_gpu_strided_views_bitwise(torch, ft, cuda):
    b, s, h, d = 2, 96, 4, 64
    qkv = torch.randn(b, s, 3, h, d, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.unbind(2)  # packed: strided views, no copy
    out = ft.attention(q, k, v, causal=True)
    out.sum().backward()  # dout with zero strides
    dense = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    out_dense = ft.attention(*dense, causal=True)
    out_dense.backward(torch.ones_like(out_dense))
    assert torch.equal(out, out_dense)
    assert torch.equal(qkv.grad, torch.stack([x.grad for x in dense], dim=2))


@pytest.mark.gpu
def test_torch_gpu_runs_on_current_stream(torch, ft, cuda):
    q0, k, v = (x.detach() for x in _inputs(torch, (1, 512, 4, 64), (1, 512, 4, 64), torch.float16, cuda))
    expected = ft.attention(q0, k, v)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        q = torch.empty_like(q0)
        torch.cuda._sleep(100_000_000)  # the side stream is busy long after the host has launched all below
        q.copy_(q0)
        out = ft.attention(q, k, v)  # reads q: correct only if it waits for the copy on the side stream
    side.synchronize()
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------- jax, GPU arrays

@pytest.mark.gpu
def test_jax_gpu_jit_grad_and_traced_seed(jax, fj):
    if not any(dev.platform == "gpu" for dev in jax.devices()):
        pytest.skip("jax sees no GPU")
    jnp = jax.numpy
    rng = np.random.default_rng(2)
    # The shape, dtype and variant of the torch dropout test: the same kernels, compiled once.
    q, k, v, dout = (jnp.asarray(rng.standard_normal((2, 40, 2, 16)), jnp.float32) for _ in range(4))
    sink = jnp.asarray([0.5, -1.0], jnp.float32)

    @jax.jit
    def fwd_bwd(q, k, v, sink, seed):
        out, vjp = jax.vjp(lambda q, k, v, s: fj.attention(q, k, v, dropout_p=0.4, dropout_seed=seed,
                                                           learnable_sink=s), q, k, v, sink)
        return out, vjp(dout)

    out, grads = fwd_bwd(q, k, v, sink, jnp.uint32(11))
    host = [np.asarray(x) for x in (q, k, v, dout, sink)]
    ref_out, ref_lse = cupyflash.reference.attention(*host[:3], dropout_p=0.4, dropout_seed=11, learnable_sink=host[4],
                                                     return_lse=True)
    ref_grads = cupyflash.reference.attention_backward(host[3], *host[:3], ref_out, ref_lse, dropout_p=0.4,
                                                       dropout_seed=11, learnable_sink=host[4], return_dsink=True)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        assert np.abs(np.asarray(got, dtype=np.float64) - want).max() <= 1e-5 * np.abs(want).max()
