"""A/B of two trees in one process: the working tree against a git revision, cell by cell.

    python tools/ab.py --against HEAD~1 bwd:64:1k:causal fwd:128:4k fwd:128:4k:softcap=50
    python tools/ab.py --against ../old-tree bwd:64:1k:causal   # a directory: where git is not

The revision's ``cupyflash`` and ``cuda_src`` are extracted into a temporary package beside the working
tree's, so both run in one process on the same inputs: batches of calls of each tree alternate (the first
tree to run switches every round), each batch timed as a whole (CUDA events on a GPU, the host clock for the
NumPy backend), and each cell reports the median time per call of each tree, the median of the per-round
ratios new / old with its quartiles, and whether the outputs are bitwise the same. Between processes the same
tree's medians move by up to 10% on a shared machine; between interleaved batches by 1-2%.

A cell is MODE:HEADDIM:SEQLEN[:causal][:deterministic][:KEY=VALUE...], MODE fwd or bwd, SEQLEN with an optional
k (x1024); deterministic (bwd only) is the backward's keyword, without which dq may be summed by atomics in no
fixed order. KEY=VALUE pairs are attention keywords (window=L,R, softcap, dropout=P), mask=padding: the bench's padding
mask (bool (batch, 1, 1, seqlen), the last 10% of each sequence's keys hidden), or alibi=bench: the bench's
ALiBi slopes. Shapes follow the FA2 protocol:
batch = TOKENS / seqlen, heads = HIDDEN / headdim.

--set MODULE.NAME=VALUE (repeatable) sets a module constant of the working tree's package before any call,
VALUE a Python literal: a tile table's setting timed against the same tree unset, without a second tree.

    python tools/ab.py --against HEAD --set _plan.SM90_BWD_STAGES=5 bwd:64:1k:causal

--cell-timeout SECONDS ends the run (exit 1, with Python's traceback on stderr) when a cell takes longer: a
kernel that never returns (a tree whose barriers deadlock) then stops the script, not the device call. The cell
is the one after the last row printed.
"""
import argparse
import ast
import contextlib
import faulthandler
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from cupyflash import bench  # noqa: E402  (the working tree's)


def load_revision(rev, into):
    """The revision's cupyflash as package ``cupyflash_ab`` (its cuda_src inside it); `rev` may also be a
    directory holding a tree's cupyflash and cuda_src (a copy without git, as on a device machine)."""
    if os.path.isdir(rev):
        for name in ("cupyflash", "cuda_src"):
            shutil.copytree(os.path.join(rev, name), os.path.join(into, name))
    else:
        archive = subprocess.run(["git", "-C", REPO, "archive", rev, "cupyflash", "cuda_src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    os.rename(os.path.join(into, "cupyflash"), os.path.join(into, "cupyflash_ab"))
    os.rename(os.path.join(into, "cuda_src"), os.path.join(into, "cupyflash_ab", "cuda_src"))
    sys.path.insert(0, into)
    return importlib.import_module("cupyflash_ab")


# Run by a process of its own: waits for the process `pid` to end, then removes `path`.
_REMOVE_AFTER = """
import os, shutil, sys, time
pid, path = int(sys.argv[1]), sys.argv[2]
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        break
    time.sleep(1)
shutil.rmtree(path, ignore_errors=True)
"""


class CellWatchdog:
    """Ends the run (exit 1) when a cell outlasts `seconds`. A timer thread prints the main thread's stack: it needs
    the GIL, which NumPy's and CUDA's blocking calls release. faulthandler's watchdog, which needs no GIL but may
    crash while it walks the frames of a thread still running, follows later, for a call that holds the GIL."""
    FALLBACK_SECONDS = 30

    def __init__(self, seconds):
        self.seconds = seconds
        self.timer = None

    def _expire(self, main_thread):
        frame = sys._current_frames().get(main_thread)
        sys.stdout.flush()
        sys.stderr.write(f"Timeout ({self.seconds:g} s)!\n" + "".join(traceback.format_stack(frame)))
        sys.stderr.flush()
        os._exit(1)

    def __enter__(self):
        self.timer = threading.Timer(self.seconds, self._expire, (threading.get_ident(),))
        self.timer.daemon = True
        self.timer.start()
        faulthandler.dump_traceback_later(self.seconds + self.FALLBACK_SECONDS, exit=True)
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        faulthandler.cancel_dump_traceback_later()


def remove_after_exit(path):
    """Removes `path` once this process has ended, however it ends: the cell timeout's exit runs no cleanup."""
    subprocess.Popen([sys.executable, "-c", _REMOVE_AFTER, str(os.getpid()), path], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def apply_setting(package, text):
    """MODULE.NAME=VALUE on `package`'s module MODULE; the constant must exist."""
    target, sep, value = text.partition("=")
    module_name, _, name = target.rpartition(".")
    if not sep or not module_name or not name:
        raise SystemExit(f"--set {text!r}: expected MODULE.NAME=VALUE, e.g. _plan.SM90_BWD_STAGES=5")
    try:
        module = importlib.import_module(f"{package.__name__}.{module_name}")
    except ImportError:
        raise SystemExit(f"--set {text!r}: no module {package.__name__}.{module_name}") from None
    if not hasattr(module, name):
        raise SystemExit(f"--set {text!r}: {module.__name__} has no {name}")
    try:
        setattr(module, name, ast.literal_eval(value))
    except (ValueError, SyntaxError):
        raise SystemExit(f"--set {text!r}: the value must be a Python literal, got {value!r}") from None


def parse_cell(text):
    mode, headdim, seqlen, *rest = text.split(":")
    if mode not in ("fwd", "bwd"):
        raise SystemExit(f"cell {text!r}: mode must be fwd or bwd, got {mode!r}")
    seqlen = int(seqlen[:-1]) * 1024 if seqlen.endswith("k") else int(seqlen)
    keywords = {"causal": False}
    for item in rest:
        if item == "causal":
            keywords["causal"] = True
            continue
        key, _, value = item.partition("=")
        if key == "window":
            keywords["window_size"] = tuple(int(x) for x in value.split(","))
        elif key == "softcap":
            keywords["softcap"] = float(value)
        elif key == "dropout":
            keywords["dropout_p"], keywords["dropout_seed"] = float(value), 7
        elif key == "mask" and value == "padding":
            keywords["attn_mask"] = value  # built per shape (run_cell)
        elif key == "alibi" and value == "bench":
            keywords["alibi_slopes"] = value  # built per shape (run_cell)
        elif item == "deterministic" and mode == "bwd":
            keywords["deterministic"] = True  # the backward's alone (run_cell)
        else:
            raise SystemExit(f"cell {text!r}: unknown keyword {key!r} (window, softcap, dropout, mask=padding, "
                             "alibi=bench, deterministic for bwd)")
    return mode, int(headdim), seqlen, keywords


class Clock:
    """Seconds of a batch of calls: CUDA events on a GPU, the host clock otherwise."""

    def __init__(self, xp):
        self.xp = xp

    def time(self, fn, calls):
        if self.xp is np:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            return time.perf_counter() - start
        start, stop = self.xp.cuda.Event(), self.xp.cuda.Event()
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        return self.xp.cuda.get_elapsed_time(start, stop) / 1e3


def run_cell(cell, trees, xp, dtype, tokens, hidden, rounds, calls):
    mode, headdim, seqlen, keywords = cell
    batch, heads = max(1, tokens // seqlen), max(1, hidden // headdim)
    q, k, v, dout = (bench.random_array((batch, seqlen, heads, headdim), dtype, xp, seed) for seed in range(4))
    if keywords.get("attn_mask") == "padding":
        keep = xp.arange(seqlen) < seqlen - seqlen // 10
        keywords = dict(keywords, attn_mask=xp.ascontiguousarray(xp.broadcast_to(keep, (batch, 1, 1, seqlen))))
    if keywords.get("alibi_slopes") == "bench":
        keywords = dict(keywords, alibi_slopes=xp.asarray(bench.alibi_slopes(heads)))
    new = trees["new"]
    backward_keywords = keywords
    keywords = {key: value for key, value in keywords.items() if key != "deterministic"}
    out, lse = new.attention(q, k, v, return_lse=True, **keywords)
    if mode == "fwd":
        fns = {name: (lambda m=m: m.attention(q, k, v, return_lse=True, **keywords)) for name, m in trees.items()}
    else:
        fns = {name: (lambda m=m: m.attention_backward(dout, q, k, v, out, lse, **backward_keywords))
               for name, m in trees.items()}
    results = {name: fn() for name, fn in fns.items()}  # and the compilations out of the timing
    pairs = list(zip(results["old"], results["new"]))
    bitwise = all(bool(xp.array_equal(a, b)) for a, b in pairs)
    # largest difference of an output relative to its largest value (a backward's dq, summed by atomics on
    # a GPU, differs in its last bits from run to run)
    difference = max(float(xp.abs(a.astype(np.float64) - b.astype(np.float64)).max()) /
                     max(float(xp.abs(a.astype(np.float64)).max()), 1e-300) for a, b in pairs)
    clock, times = Clock(xp), {"old": [], "new": []}
    for round_ in range(rounds):
        for name in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
            times[name].append(clock.time(fns[name], calls) / calls)
    ratios = sorted(n / o for n, o in zip(times["new"], times["old"]))
    quartile = len(ratios) // 4
    return (statistics.median(times["old"]) * 1e3, statistics.median(times["new"]) * 1e3,
            statistics.median(ratios), ratios[quartile], ratios[-1 - quartile], bitwise, difference)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cells", nargs="+", help="MODE:HEADDIM:SEQLEN[:causal][:KEY=VALUE...]")
    p.add_argument("--against", required=True,
                   help="the git revision timed as 'old', or a directory holding its cupyflash and cuda_src")
    p.add_argument("--dtype", default=None, choices=sorted(bench.DTYPES),
                   help="bfloat16 on a GPU, float32 on the NumPy backend by default")
    p.add_argument("--cpu", action="store_true", help="the NumPy backend, even where a GPU is")
    p.add_argument("--tokens", type=int, default=None, help="batch x seqlen (16384 on a GPU, 256 on the CPU)")
    p.add_argument("--hidden", type=int, default=None, help="heads x headdim (2048 on a GPU, 64 on the CPU)")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--calls", type=int, default=5, help="calls per timed batch")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="a module constant of the working tree's package, set before any call")
    p.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                   help="end the run when a cell takes longer (exit 1)")
    args = p.parse_args(argv)
    cells = [parse_cell(c) for c in args.cells]

    gpu = not args.cpu and bench.gpu_unavailable_reason() is None
    if gpu:
        import cupy as xp
    else:
        xp = np
    dtype = bench.DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    tokens = args.tokens or (16384 if gpu else 256)
    hidden = args.hidden or (2048 if gpu else 64)

    tmp = tempfile.mkdtemp(prefix="cupyflash-ab-")
    if args.cell_timeout:
        remove_after_exit(tmp)
    try:
        trees = {"old": load_revision(args.against, tmp), "new": importlib.import_module("cupyflash")}
        for setting in args.set:
            apply_setting(trees["new"], setting)
        settings = f" with {', '.join(args.set)}" if args.set else ""
        print(f"{'GPU' if gpu else 'NumPy backend'}, {np.dtype(dtype).name}, {tokens} tokens, hidden {hidden}; "
              f"old: {args.against}, new: the working tree{settings}; {args.rounds} rounds of {args.calls} calls")
        print("| cell | old ms | new ms | new / old | quartiles | outputs bitwise | largest difference |")
        print("|---|---|---|---|---|---|---|")
        for text, cell in zip(args.cells, cells):
            with CellWatchdog(args.cell_timeout) if args.cell_timeout else contextlib.nullcontext():
                old_ms, new_ms, ratio, low, high, bitwise, difference = run_cell(cell, trees, xp, dtype, tokens,
                                                                                 hidden, args.rounds, args.calls)
            print(f"| {text} | {old_ms:.3f} | {new_ms:.3f} | {ratio:.3f} | {low:.3f}-{high:.3f} | "
                  f"{'yes' if bitwise else 'no'} | {difference:.1e} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
