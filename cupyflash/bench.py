"""Benchmark cupyflash against standard attention and PyTorch SDPA.

    python -m cupyflash.bench                      # FlashAttention-2 paper sweep
    python -m cupyflash.bench --quick --json r.json --plot docs/img/

The default sweep follows the FlashAttention-2 paper: 16k tokens per batch
(batch = 16384 / seqlen), hidden size 2048 (nheads = 2048 / headdim),
seqlen 512 ... 16k, headdim 64 and 128, causal and not, bfloat16, and the
modes fwd, bwd and fwd+bwd.  Every case runs cupyflash and its peers on the
same random inputs:

* ``naive``: standard attention in CuPy, S = Q Kᵀ and P = softmax(S)
  materialised in float32 (float64 for float64 inputs), with its backward
  written out explicitly;
* ``torch-flash``, ``torch-efficient``, ``torch-cudnn`` (and ``torch-math``
  when asked for): ``torch.nn.functional.scaled_dot_product_attention``
  pinned to one backend, fed the same CuPy arrays through DLPack (no copy).

FLOPs: 4 * batch * nheads * seqlen_q * seqlen_k * headdim for the forward,
halved when causal; backward = 2.5x and fwd+bwd = 3.5x the forward.  Times
are the median of CUDA-event timings after warm-up.  Without a GPU the
NumPy backend is compared with naive NumPy attention at small sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import tracemalloc
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import ml_dtypes
import numpy as np

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
TORCH_BACKENDS = {
    "torch-flash": "FLASH_ATTENTION",
    "torch-efficient": "EFFICIENT_ATTENTION",
    "torch-cudnn": "CUDNN_ATTENTION",
    "torch-math": "MATH",
}
PEERS = ("naive", *TORCH_BACKENDS)
ALL_PEERS = ("naive", "torch-flash", "torch-efficient", "torch-cudnn")  # 'all': MATH only on request
DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
TOKENS_PER_BATCH = 16384
HIDDEN = 2048
MiB = 2**20

# Defaults per backend: (seqlens, headdims, repeats, warmup); the --quick variant second.
GPU_SWEEP = ((512, 1024, 2048, 4096, 8192, 16384), (64, 128), 30, 5)
GPU_QUICK = ((512, 2048), (64, 128), 10, 3)
CPU_SWEEP = ((128, 256, 512), (64,), 5, 1)
CPU_QUICK = ((128, 256), (64,), 3, 1)


@dataclass(frozen=True)
class Case:
    mode: str
    causal: bool
    headdim: int
    seqlen: int
    batch: int
    nheads: int
    nheads_kv: int
    dtype: str

    @property
    def flops(self) -> float:
        forward = 4 * self.batch * self.nheads * self.seqlen**2 * self.headdim
        return forward * (0.5 if self.causal else 1.0) * FLOP_FACTOR[self.mode]

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.headdim)


@dataclass
class Result:
    status: str  # "ok", "OOM" or "n/a"
    ms: float | None = None
    tflops: float | None = None
    peak_bytes: int | None = None
    error: str = ""


# --------------------------------------------------------------------------- inputs

def random_array(shape, dtype, xp=np, seed=0):
    """Standard-normal array of ``dtype`` (float16, bfloat16, float32, float64).

    Half-precision values are drawn in float32 and rounded to nearest by ``astype``
    (CuPy 14 and ml_dtypes both convert float32 -> bfloat16 natively).
    """
    dtype = np.dtype(dtype)
    base = np.float64 if dtype == np.float64 else np.float32
    if xp is np:
        x = np.random.default_rng(seed).standard_normal(shape, dtype=base)
    else:
        xp.random.seed(seed)
        x = xp.random.standard_normal(shape, dtype=base)
    return x.astype(dtype)


def make_inputs(case: Case, xp) -> dict:
    dtype = DTYPES[case.dtype]
    q_shape = (case.batch, case.seqlen, case.nheads, case.headdim)
    kv_shape = (case.batch, case.seqlen, case.nheads_kv, case.headdim)
    return {
        "q": random_array(q_shape, dtype, xp, seed=1),
        "k": random_array(kv_shape, dtype, xp, seed=2),
        "v": random_array(kv_shape, dtype, xp, seed=3),
        "dout": random_array(q_shape, dtype, xp, seed=4),
    }


# --------------------------------------------------------------------------- naive attention

def _array_module(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def _heads_first(x, compute_dtype, groups=1):
    """(batch, seq, heads, dim) -> (batch, heads * groups, seq, dim) in compute_dtype."""
    xp = _array_module(x)
    x = x.astype(compute_dtype, copy=False)
    if groups > 1:
        x = xp.repeat(x, groups, axis=2)
    return x.transpose(0, 2, 1, 3)


def _compute_dtype(dtype):
    # CuPy's matmul refuses bfloat16, so standard attention computes in float32.
    return np.float64 if dtype == np.float64 else np.float32


def naive_forward(q, k, v, causal, scale):
    """Standard attention; returns (out, P) with P = softmax(Q Kᵀ scale) materialised."""
    xp = _array_module(q)
    ct = _compute_dtype(q.dtype)
    groups = q.shape[2] // k.shape[2]
    sq, sk = q.shape[1], k.shape[1]
    s = _heads_first(q, ct) @ _heads_first(k, ct, groups).swapaxes(-1, -2)
    s *= scale
    if causal:  # bottom-right aligned: query i sees keys j <= i + sk - sq
        s += xp.triu(xp.full((sq, sk), -xp.inf, dtype=ct), k=sk - sq + 1)
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    out = s @ _heads_first(v, ct, groups)
    return out.transpose(0, 2, 1, 3).astype(q.dtype), s


def naive_backward(dout, q, k, v, out, p, scale):
    """Explicit backward of standard attention given the saved probabilities P."""
    ct = _compute_dtype(q.dtype)
    groups = q.shape[2] // k.shape[2]
    do = _heads_first(dout, ct)
    dv = p.swapaxes(-1, -2) @ do
    ds = do @ _heads_first(v, ct, groups).swapaxes(-1, -2)  # dP
    ds -= (do * _heads_first(out, ct)).sum(axis=-1, keepdims=True)
    ds *= p  # dS = P * (dP - rowsum(dO * O))
    dq = ds @ _heads_first(k, ct, groups)
    dk = ds.swapaxes(-1, -2) @ _heads_first(q, ct)
    dq *= scale
    dk *= scale

    def back(x, heads):  # (b, h, s, d) -> (b, s, heads, d), summing GQA groups
        b, h, s, d = x.shape
        return x.reshape(b, heads, h // heads, s, d).sum(axis=2).transpose(0, 2, 1, 3).astype(q.dtype)

    return back(dq, q.shape[2]), back(dk, k.shape[2]), back(dv, k.shape[2])


# --------------------------------------------------------------------------- implementations
# Each builder does the per-mode setup (e.g. the forward whose outputs a bwd
# case consumes) and returns a zero-argument callable that runs the mode once.

def build_cupyflash(case: Case, x: dict) -> Callable:
    import cupyflash

    q, k, v, dout, causal = x["q"], x["k"], x["v"], x["dout"], case.causal
    if case.mode == "fwd":
        return lambda: cupyflash.attention(q, k, v, causal=causal)
    if case.mode == "bwd":
        out, lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
        return lambda: cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal)

    def fwd_bwd():
        _, vjp = cupyflash.attention_vjp(q, k, v, causal=causal)
        return vjp(dout)

    return fwd_bwd


def build_naive(case: Case, x: dict) -> Callable:
    q, k, v, dout, causal, scale = x["q"], x["k"], x["v"], x["dout"], case.causal, case.scale
    if case.mode == "fwd":
        return lambda: naive_forward(q, k, v, causal, scale)[0]
    if case.mode == "bwd":
        out, p = naive_forward(q, k, v, causal, scale)
        return lambda: naive_backward(dout, q, k, v, out, p, scale)

    def fwd_bwd():
        out, p = naive_forward(q, k, v, causal, scale)
        return naive_backward(dout, q, k, v, out, p, scale)

    return fwd_bwd


def build_torch(backend_name: str, case: Case, x: dict) -> Callable:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = getattr(SDPBackend, backend_name)
    # Zero-copy DLPack views, transposed to SDPA's (batch, heads, seq, dim) layout.
    q, k, v, dout = (torch.from_dlpack(x[n]).transpose(1, 2) for n in ("q", "k", "v", "dout"))
    kwargs = {"is_causal": case.causal}  # seqlen_q == seqlen_k: top-left == bottom-right
    if case.nheads != case.nheads_kv:
        kwargs["enable_gqa"] = True

    def forward():
        with sdpa_kernel(backend):
            return sdpa(q, k, v, **kwargs)

    if case.mode == "fwd":
        return torch.no_grad()(forward)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if case.mode == "bwd":
        out = forward()
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), (q, k, v), dout)


def builder(impl: str) -> Callable[[Case, dict], Callable]:
    if impl == "cupyflash":
        return build_cupyflash
    if impl == "naive":
        return build_naive
    return lambda case, x: build_torch(TORCH_BACKENDS[impl], case, x)


# --------------------------------------------------------------------------- backends

class GpuBackend:
    name = "cuda"

    def __init__(self, torch_module=None):
        import cupy

        self.xp = cupy
        self.pool = cupy.get_default_memory_pool()
        self.torch = torch_module

    def measure(self, fn: Callable, repeats: int, warmup: int) -> tuple[float, int]:
        import cupyx.profiler

        # Peak memory.  After free_all_blocks() the CuPy pool holds exactly the
        # live arrays (the case's inputs plus this implementation's setup), so
        # total_bytes() == used_bytes().  The pool reuses its cached blocks
        # before asking the device for more and never hands memory back on its
        # own, so after one call total_bytes() is the call's high-water mark of
        # simultaneously live bytes (rounded up to the pool's 512-byte unit).
        # Torch allocates through its own caching allocator: its peak
        # (max_memory_allocated, reset here) is added.
        self.cleanup()
        if self.torch is not None:
            self.torch.cuda.reset_peak_memory_stats()
        fn()
        self.xp.cuda.Device().synchronize()
        peak = self.pool.total_bytes()
        if self.torch is not None:
            peak += self.torch.cuda.max_memory_allocated()
        # Torch runs on the legacy default stream, which is also CuPy's current
        # stream, so the CUDA events recorded by benchmark() bracket its kernels.
        timing = cupyx.profiler.benchmark(fn, n_repeat=repeats, n_warmup=warmup)
        return float(np.median(timing.gpu_times[0])) * 1e3, peak

    def cleanup(self):
        self.pool.free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()

    def is_oom(self, exc: BaseException) -> bool:
        oom_types = [self.xp.cuda.memory.OutOfMemoryError]
        if self.torch is not None:
            oom_types.append(self.torch.cuda.OutOfMemoryError)
        # cuBLAS workspace failures surface as plain errors mentioning the allocation.
        return isinstance(exc, tuple(oom_types)) or "out of memory" in str(exc).lower()


class CpuBackend:
    name = "numpy"
    xp = np

    def measure(self, fn: Callable, repeats: int, warmup: int) -> tuple[float, int]:
        for _ in range(warmup):
            fn()
        # tracemalloc is tracing since before the inputs were created and NumPy
        # reports its buffers to it, so the peak includes inputs and setup.
        tracemalloc.reset_peak()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e3, peak

    def cleanup(self):
        pass

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, MemoryError)


def gpu_unavailable_reason() -> str | None:
    """None when CuPy sees a CUDA device, else why not."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
        return "no CUDA device"
    except Exception as exc:  # ImportError, CUDARuntimeError (no driver), ...
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def load_torch():
    """torch if importable with CUDA, else None.  Never imported at package import."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# --------------------------------------------------------------------------- sweep

def run_case(impl: str, case: Case, inputs: dict, backend, repeats: int, warmup: int) -> Result:
    """Time one implementation on one case; OOM and unsupported cases become a status."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch explains every backend it rejects
            ms, peak = backend.measure(builder(impl)(case, inputs), repeats, warmup)
        result = Result("ok", ms, case.flops / (ms * 1e-3) / 1e12, peak)
    except Exception as exc:
        status = "OOM" if backend.is_oom(exc) else "n/a"
        result = Result(status, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    backend.cleanup()  # after the except block, so the traceback's arrays are gone
    return result


def build_cases(modes, causals, headdims, seqlens, dtype, batch, nheads, nheads_kv) -> list[Case]:
    cases = []
    for mode in modes:
        for causal in causals:
            for hd in headdims:
                for s in seqlens:
                    h = nheads or max(1, HIDDEN // hd)
                    cases.append(Case(mode, causal, hd, s, batch or max(1, TOKENS_PER_BATCH // s),
                                      h, nheads_kv or h, dtype))
    return cases


class _Counter:
    """Minimal stand-in for tqdm: one status line rewritten in place."""

    def __init__(self, total):
        self.total, self.n, self.text = total, 0, ""

    def set_description(self, text):
        self.text = text

    def update(self, n=1):
        self.n += n
        print(f"\r[{self.n}/{self.total}] {self.text:<48}", end="", file=sys.stderr, flush=True)

    def close(self):
        print(file=sys.stderr)


def progress(total):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total)
    return tqdm(total=total, file=sys.stderr, leave=False, unit="run")


def sweep(cases, impls, backend, repeats, warmup) -> list[dict[str, Result]]:
    rows = []
    bar = progress(len(cases) * len(impls))
    try:
        for case in cases:
            inputs = make_inputs(case, backend.xp)
            row = {}
            for impl in impls:
                bar.set_description(f"{impl} {case.mode} {'causal ' if case.causal else ''}"
                                    f"d{case.headdim} n{case.seqlen}")
                row[impl] = run_case(impl, case, inputs, backend, repeats, warmup)
                bar.update()
            rows.append(row)
            del inputs
            backend.cleanup()
    finally:
        bar.close()
    return rows


# --------------------------------------------------------------------------- output

def ratio(peer: Result, ours: Result) -> float | None:
    """Peer time / cupyflash time (> 1: cupyflash is faster)."""
    if peer.status == "ok" and ours.status == "ok":
        return peer.ms / ours.ms
    return None


def format_table(cases, rows, impls) -> str:
    peers = impls[1:]
    header = ["mode", "causal", "hdim", "seqlen"]
    for impl in impls:
        header += ["ms", "TFLOP/s", "MiB"]
    header += [f"vs {p}" for p in peers]
    body = []
    for case, row in zip(cases, rows):
        cells = [case.mode, "yes" if case.causal else "no", str(case.headdim), str(case.seqlen)]
        for impl in impls:
            r = row[impl]
            if r.status == "ok":
                cells += [f"{r.ms:.3f}", f"{r.tflops:.4g}", f"{r.peak_bytes / MiB:.1f}"]
            else:
                cells += [r.status, "-", "-"]
        for p in peers:
            x = ratio(row[p], row["cupyflash"])
            cells.append("-" if x is None else f"{x:.2f}x")
        body.append(cells)
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    # Group titles over the columns: (first column, number of columns, title).
    groups = [(4 + 3 * i, 3, impl) for i, impl in enumerate(impls)]
    if peers:
        groups.append((4 + 3 * len(impls), len(peers), "cupyflash speed-up"))
    for first, span, title in groups:  # widen a group's last column to fit its title
        extra = len(title) - (sum(widths[first:first + span]) + 2 * (span - 1))
        widths[first + span - 1] += max(0, extra)
    titles = [" " * (sum(widths[:4]) + 6)]
    titles += [title.ljust(sum(widths[f:f + s]) + 2 * (s - 1)) for f, s, title in groups]

    def fmt(cells):
        return "  ".join(c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    lines = ["  ".join(titles).rstrip(), fmt(header)]
    lines.append("-" * len(lines[1]))
    lines += [fmt(cells) for cells in body]
    return "\n".join(lines)


def git_commit() -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def environment(backend, torch_module) -> dict[str, Any]:
    import cupyflash

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cupyflash": getattr(cupyflash, "__version__", "unknown"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "backend": backend.name,
    }
    if backend.name == "cuda":
        cupy = backend.xp
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        env.update({
            "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "compute_capability": dev.compute_capability,
            "driver": _cuda_version(cupy.cuda.runtime.driverGetVersion()),
            "cuda_runtime": _cuda_version(cupy.cuda.runtime.runtimeGetVersion()),
            "cupy": cupy.__version__,
        })
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    if torch_module is not None:
        env["torch"] = torch_module.__version__
    return env


def to_json(cases, rows, impls, env, settings) -> dict:
    records = []
    for case, row in zip(cases, rows):
        record = {**asdict(case), "flops": case.flops, "results": {i: asdict(row[i]) for i in impls}}
        record["speedup"] = {p: ratio(row[p], row["cupyflash"]) for p in impls[1:]}
        records.append(record)
    return {"environment": env, "settings": settings, "cases": records}


def plot_paths(path: str) -> tuple[str, str]:
    """A directory (existing, or ending in a separator) gets tflops.png and memory.png;
    anything else is a file-name prefix."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        os.makedirs(path, exist_ok=True)
        return os.path.join(path, "tflops.png"), os.path.join(path, "memory.png")
    sep = "" if path.endswith(("_", "-", ".")) else "_"
    return f"{path}{sep}tflops.png", f"{path}{sep}memory.png"


def plot(cases, rows, impls, path: str) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((c.mode, c.causal, c.headdim) for c in cases))
    columns = list(dict.fromkeys(p[1:] for p in panels))
    modes = list(dict.fromkeys(p[0] for p in panels))
    seqlens = sorted({c.seqlen for c in cases})
    outputs = plot_paths(path)
    for filename, metric, label in zip(outputs, ("tflops", "peak_bytes"), ("TFLOP/s", "peak memory (MiB)")):
        fig, axes = plt.subplots(len(modes), len(columns), squeeze=False, sharex=True,
                                 figsize=(3.6 * len(columns), 2.8 * len(modes)))
        for (mode, causal, hd) in panels:
            ax = axes[modes.index(mode)][columns.index((causal, hd))]
            for impl in impls:
                pts = [(c.seqlen, getattr(row[impl], metric)) for c, row in zip(cases, rows)
                       if (c.mode, c.causal, c.headdim) == (mode, causal, hd) and row[impl].status == "ok"]
                if pts:
                    xs, ys = zip(*pts)
                    ys = [y / MiB for y in ys] if metric == "peak_bytes" else ys
                    ax.plot(xs, ys, marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            ax.minorticks_off()
            if metric == "peak_bytes":
                ax.set_yscale("log")
            ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}, hdim {hd}", fontsize=9)
            ax.grid(alpha=0.3)
        for ax in axes[-1]:
            ax.set_xlabel("seqlen")
        for ax in axes[:, 0]:
            ax.set_ylabel(label)
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", ncol=len(impls), frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        fig.savefig(filename, dpi=120)
        plt.close(fig)
    return outputs


# --------------------------------------------------------------------------- CLI

def _int_list(text: str) -> list[int]:
    """'512,1k,16k' -> [512, 1024, 16384]."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        out.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
    return out


def _peer_list(text: str) -> list[str]:
    text = text.strip().lower()
    if text in ("all", "none", ""):
        return list(ALL_PEERS) if text == "all" else []
    peers = [p.strip() for p in text.split(",")]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}; choose from {list(PEERS)}, 'all' or 'none'")
    return peers


def _mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",")]
    if not set(modes) <= set(MODES):
        raise argparse.ArgumentTypeError(f"modes must be among {list(MODES)}")
    return modes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cupyflash-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--headdims", type=_int_list, help="comma list, e.g. 64,128")
    p.add_argument("--seqlens", type=_int_list, help="comma list, e.g. 512,1k,16k")
    p.add_argument("--batch", type=int, help="override batch (default 16384 // seqlen on GPU)")
    p.add_argument("--nheads", type=int, help="override nheads (default 2048 // headdim on GPU)")
    p.add_argument("--nheads-kv", type=int, help="key/value heads for GQA (default nheads)")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--modes", type=_mode_list, default=list(MODES), help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--peers", type=_peer_list, default=list(ALL_PEERS),
                   help="comma list of naive,torch-flash,torch-efficient,torch-cudnn,torch-math, "
                        "or 'all' (everything but torch-math) or 'none'")
    p.add_argument("--repeats", type=int, help="timed runs per case (default 30)")
    p.add_argument("--warmup", type=int, help="untimed runs before timing (default 5)")
    p.add_argument("--quick", action="store_true", help="small sweep: seqlen 512,2048 (CPU: 128,256), fewer repeats")
    p.add_argument("--cpu", action="store_true", help="benchmark the NumPy backend even if a GPU is present")
    p.add_argument("--json", metavar="PATH", help="write every figure and the environment as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="directory or file prefix for tflops.png and memory.png (needs matplotlib)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = "--cpu given" if args.cpu else gpu_unavailable_reason()
    peers = list(args.peers)
    torch_module = None
    if reason is None:
        if any(p in TORCH_BACKENDS for p in peers):
            torch_module = load_torch()
            if torch_module is None:
                print("torch with CUDA not importable: skipping the torch peers")
                peers = [p for p in peers if p not in TORCH_BACKENDS]
        backend = GpuBackend(torch_module)
        seqlens, headdims, repeats, warmup = GPU_QUICK if args.quick else GPU_SWEEP
        dtype, batch, nheads = args.dtype or "bfloat16", args.batch, args.nheads
    else:
        print(f"No GPU ({reason}): benchmarking the NumPy backend against naive NumPy at small sizes.")
        peers = [p for p in peers if p == "naive"]
        backend = CpuBackend()
        seqlens, headdims, repeats, warmup = CPU_QUICK if args.quick else CPU_SWEEP
        dtype, batch, nheads = args.dtype or "float32", args.batch or 1, args.nheads or 2
    seqlens = args.seqlens or seqlens
    headdims = args.headdims or headdims
    repeats = args.repeats or repeats
    warmup = warmup if args.warmup is None else args.warmup
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    impls = ["cupyflash", *peers]
    cases = build_cases(args.modes, causals, headdims, seqlens, dtype, batch, nheads, args.nheads_kv)

    if backend.name == "numpy":
        tracemalloc.start()
    try:
        rows = sweep(cases, impls, backend, repeats, warmup)
    finally:
        if backend.name == "numpy":
            tracemalloc.stop()

    env = environment(backend, torch_module)
    print(f"{env['device']} | {dtype} | median of {repeats} runs after {warmup} warm-up | "
          f"peak memory includes inputs")
    print(format_table(cases, rows, impls))
    errors = sorted({f"{impl}: {r.error}" for row in rows for impl, r in row.items() if r.status == "n/a"})
    for line in errors:
        print(f"n/a  {line}")
    if args.json:
        settings = {"dtype": dtype, "repeats": repeats, "warmup": warmup, "impls": impls}
        with open(args.json, "w") as f:
            json.dump(to_json(cases, rows, impls, env, settings), f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        print("wrote " + " and ".join(plot(cases, rows, impls, args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
