"""The developer tools that run without a GPU."""
import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.isdir(os.path.join(CHECKOUT, ".git")), reason="needs the git checkout")
def test_ab_times_the_working_tree_against_a_revision():
    """tools/ab.py on the NumPy backend against HEAD: a row per cell, and where the working tree's package
    is HEAD's (as in CI), outputs bitwise the same."""
    run = subprocess.run([sys.executable, os.path.join(CHECKOUT, "tools", "ab.py"), "--against", "HEAD", "--cpu",
                          "--rounds", "2", "--calls", "1", "--tokens", "128", "--hidden", "32",
                          "fwd:16:64:causal", "bwd:16:64:window=8,0:softcap=20"],
                         capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| fwd") or line.startswith("| bwd")]
    assert [row.split(" | ")[0] for row in rows] == ["| fwd:16:64:causal", "| bwd:16:64:window=8,0:softcap=20"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[3]) > 0
        assert cells[5] in ("yes", "no") and float(cells[6]) >= 0
    unchanged = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "cupyflash"], cwd=CHECKOUT).returncode == 0
    if unchanged:
        assert all(row.split(" | ")[5] == "yes" for row in rows)


def test_ab_takes_a_directory_as_the_old_tree(tmp_path):
    """--against DIR: the tree of a directory (cupyflash and cuda_src, no git), here the checkout's own; the
    bench's ALiBi slopes and padding mask built per cell."""
    run = subprocess.run([sys.executable, os.path.join(CHECKOUT, "tools", "ab.py"), "--against", CHECKOUT, "--cpu",
                          "--rounds", "1", "--calls", "1", "--tokens", "64", "--hidden", "16", "bwd:16:32:causal",
                          "fwd:16:32:alibi=bench:mask=padding"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| bwd", "| fwd"))]
    assert [row.split(" | ")[0] for row in rows] == ["| bwd:16:32:causal", "| fwd:16:32:alibi=bench:mask=padding"]
    assert all(row.split(" | ")[5] == "yes" for row in rows)


def test_ab_sets_a_constant_of_the_working_tree(tmp_path):
    """--set MODULE.NAME=VALUE: named in the header; a name the module lacks, or a value that is not a
    literal, stops the run before any cell."""
    base = [sys.executable, os.path.join(CHECKOUT, "tools", "ab.py"), "--against", CHECKOUT, "--cpu", "--rounds", "1",
            "--calls", "1", "--tokens", "64", "--hidden", "16"]
    run = subprocess.run([*base, "--set", "_plan.SM90_BWD_STAGES=5", "fwd:16:32"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "new: the working tree with _plan.SM90_BWD_STAGES=5;" in run.stdout
    for setting, message in (("_plan.NO_SUCH_TABLE=1", "cupyflash._plan has no NO_SUCH_TABLE"),
                             ("_plan.SM90_BWD_STAGES=five", "must be a Python literal, got 'five'"),
                             ("_nowhere.X=1", "no module cupyflash._nowhere"),
                             ("SM90_BWD_STAGES=5", "expected MODULE.NAME=VALUE")):
        run = subprocess.run([*base, "--set", setting, "fwd:16:32"], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
        assert run.returncode != 0 and message in run.stderr, (setting, run.stderr)
        assert "| fwd" not in run.stdout


@pytest.mark.skipif(not os.path.isdir(os.path.join(CHECKOUT, ".git")), reason="needs the git checkout")
def test_ab_ends_a_run_whose_cell_outlasts_its_timeout(tmp_path):
    """A cell past --cell-timeout ends the run with a traceback, after the rows of the cells before it, and
    the copy of the old tree goes with it."""
    run = subprocess.run([sys.executable, os.path.join(CHECKOUT, "tools", "ab.py"), "--against", "HEAD", "--cpu",
                          "--rounds", "2", "--calls", "1", "--tokens", "32768", "--hidden", "16",
                          "--cell-timeout", "10", "fwd:16:16", "fwd:64:32768"],  # about 0.2 s, then 80 s
                         capture_output=True, text=True, timeout=300, cwd=CHECKOUT,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert run.returncode == 1 and "Timeout" in run.stderr and "run_cell" in run.stderr, run.stderr
    assert "| fwd:16:16 |" in run.stdout and "| fwd:64:32768 |" not in run.stdout
    deadline = time.monotonic() + 30  # the remover looks once a second
    while os.listdir(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert os.listdir(tmp_path) == []


def test_ab_rejects_an_unknown_cell():
    run = subprocess.run([sys.executable, os.path.join(CHECKOUT, "tools", "ab.py"), "--against", "HEAD", "--cpu",
                          "mid:64:1k"], capture_output=True, text=True, timeout=60, cwd=CHECKOUT)
    assert run.returncode != 0 and "mode must be fwd or bwd, got 'mid'" in run.stderr


def test_gpu_validation_rejects_an_unknown_stage_or_part():
    """tools/gpu_validate.sh's stages and tools/sanitize_cases.py's parts are checked before any work."""
    run = subprocess.run(["bash", os.path.join(CHECKOUT, "tools", "gpu_validate.sh"), "suite", "sanitise"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown stage 'sanitise' (suite, sm80, simt, sanitize, fuzz)" in run.stderr
    run = subprocess.run([sys.executable, os.path.join(CHECKOUT, "tools", "sanitize_cases.py"), "packed", "dense"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "unknown part 'dense'; the parts are dense16, dense32, packed, decode, wide, families" in run.stderr


def _fuzz():
    spec = importlib.util.spec_from_file_location("fuzz", os.path.join(CHECKOUT, "tools", "fuzz.py"))
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    return fuzz


@pytest.mark.parametrize("family", ["", "sm80", "simt"])
def test_fuzz_draws_every_kind_within_its_bounds(family):
    """tools/fuzz.py's draws reach every variant, layout, head dimension class and dtype of a family (only
    float32 and float64 on the CUDA-core kernels), empty packed sequences and caches, and keep a dense
    case's work within the float64 reference's budget."""
    fuzz = _fuzz()
    rng = np.random.default_rng(0)
    dense = [fuzz.dense_case(rng, family) for _ in range(600)]
    for (batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, *_), *_ in dense:
        assert batch * nheads * seqlen_q * seqlen_k * headdim <= fuzz.MAX_WORK and 1 <= headdim <= 256
        assert nheads % nheads_kv == 0 and min(seqlen_q, seqlen_k) >= 1
    assert {name for _, _, names, _ in dense for name in names} == {*fuzz.DENSE_VARIANTS, "all"}
    if family == "":  # the fuzz's names are the suite's (test_gpu_variants needs CuPy, not a GPU, to import)
        test_gpu_variants = pytest.importorskip("test_gpu_variants")
        assert (*fuzz.DENSE_VARIANTS, "all") == test_gpu_variants.VARIANTS
    assert {layout for _, layout, _, _ in dense} == {"contiguous", "bhsd", "padded", "offset"}
    assert {nans > 0 for *_, nans in dense} == {True, False}
    assert {problem[5] > 128 for problem, *_ in dense} == {True, False}
    wide = {np.dtype(np.float32), np.dtype(np.float64)}
    assert {problem[6] for problem, *_ in dense} == (wide if family == "simt" else set(fuzz.dtypes("")))
    packed = [fuzz.packed_case(rng, family) for _ in range(200)]
    assert any(0 in pair for lengths, *_ in packed for pair in lengths)
    assert {name for _, _, _, names, *_ in packed for name in names} == set(fuzz.PACKED_VARIANTS)
    decodes = [fuzz.decode_case(rng, family, 8) for _ in range(200)]
    assert any(0 in lengths for lengths, *_ in decodes)
    # up to 40 query positions, whose rows per kv head fill several slabs of a decode block
    assert max(seqlen_q for _, _, seqlen_q, *_ in decodes) > 16
    assert {case[7] for case in decodes} == set(range(8))
    assert {case[-2] for case in decodes} <= ({np.dtype(np.float32)} if family == "simt" else set(fuzz.dtypes("")[:3]))


def test_fuzz_nans_and_where_they_reach():
    """tools/fuzz.py's NaN cases: NaNs only, at most the drawn count, the data otherwise the problem's; and
    its comparison fails on a NaN where the reference is finite or a finite value where it is NaN."""
    fuzz = _fuzz()
    from helpers import Problem
    args = (2, 9, 11, 4, 2, 16, np.float32, False, None, None, 7)
    clean = Problem(*args).arrays()
    dirty = fuzz.with_nans(Problem, 5)(*args).arrays()
    nans = sum(int(np.isnan(x).sum()) for x in dirty)
    assert 1 <= nans <= 5 and not any(np.isinf(x).any() for x in dirty)
    assert all(np.array_equal(a[~np.isnan(b)], b[~np.isnan(b)]) for a, b in zip(clean, dirty))
    want = np.array([1.0, np.nan, np.inf])
    fuzz.same_nonfinite(np.array([2.0, np.nan, np.inf]), want, "out")
    for got in ([np.nan, np.nan, np.inf], [1.0, 1.0, np.inf], [1.0, np.nan, -np.inf]):
        with pytest.raises(AssertionError):
            fuzz.same_nonfinite(np.array(got), want, "out")
