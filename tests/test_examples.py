"""CPU smoke tests of the examples and of ``python -m cupyflash.bench`` (NumPy paths).

They run in a temporary directory, so that ``-m`` and the scripts import the installed
cupyflash rather than the checkout."""
import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import cupyflash

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run(*args, cwd, timeout=120):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_quickstart_numpy(tmp_path):
    out = run(os.path.join(EXAMPLES, "quickstart.py"), "--numpy", cwd=tmp_path)
    errors = [float(e) for e in re.findall(r"max \|error\| vs float64 reference = (\S+)", out)]
    assert len(errors) == 4 and max(errors) < 1e-4, out


def test_train_transformer_on_numpy_picks_tiny_preset_and_loss_decreases(tmp_path):
    out = run(os.path.join(EXAMPLES, "train_transformer.py"), "--numpy", cwd=tmp_path, timeout=180)
    assert "the tiny preset on NumPy" in out, out
    losses = [float(x) for x in re.findall(r"\| loss (\S+) \| val", out)]
    assert len(losses) >= 3, out
    assert losses[-1] < losses[0] - 0.5, out
    assert "sample:" in out


def test_train_transformer_gradcheck(tmp_path):
    out = run(os.path.join(EXAMPLES, "train_transformer.py"), "--gradcheck", cwd=tmp_path)
    assert "gradcheck PASSED" in out, out


def test_generate_with_and_without_kv_cache_agree(tmp_path):
    out = run(os.path.join(EXAMPLES, "generate.py"), "--numpy", cwd=tmp_path)
    assert "same tokens: yes" in out, out
    assert len(re.findall(r"\d tokens/s", out)) == 2, out


def test_self_check_fails_a_wrong_result(monkeypatch, capsys):
    import cupyflash.__main__ as self_check

    def off_by_a_tenth(q, k, v, **kwargs):
        out, lse = cupyflash.attention(q, k, v, **kwargs)
        return out + out.dtype.type(0.1), lse

    monkeypatch.setattr(self_check, "attention", off_by_a_tenth)
    failed = self_check.check_errors(np, shape=(1, 64, 64, 2, 1, 32))
    out = capsys.readouterr().out
    assert len(failed) == 2 * len(self_check.DTYPES) == out.count("FAIL"), out


def test_bench_cpu_quick(tmp_path):
    path = tmp_path / "bench.json"
    out = run("-m", "cupyflash.bench", "--cpu", "--quick", "--modes", "fwd,bwd", "--json", str(path), cwd=tmp_path)
    assert "cupyflash" in out and "naive" in out
    import json

    data = json.loads(path.read_text())
    assert data["environment"]["backend"] == "numpy"
    assert all(case["results"]["cupyflash"]["status"] == "ok" for case in data["cases"]), data["cases"]


@pytest.mark.parametrize("queries", [1, 3])
def test_bench_cpu_decode(tmp_path, queries):
    path = tmp_path / "decode.json"
    out = run("-m", "cupyflash.bench", "--cpu", "--decode", "--seqlens", "128,256", "--repeats", "2", "--queries",
              str(queries), "--json", str(path), cwd=tmp_path)
    assert "GB/s" in out and "cache" in out and "queries" in out, out
    import json

    cases = json.loads(path.read_text())["cases"]
    assert {(c["mode"], c["batch"], c["seqlen"], c["queries"]) for c in cases} == {
        ("decode", b, s, queries) for b in (1, 4) for s in (128, 256)}
    for case in cases:
        ours = case["results"]["cupyflash"]
        assert ours["status"] == "ok" and ours["gbps"] > 0, case
        assert case["flops"] == 4 * case["batch"] * case["nheads"] * queries * case["seqlen"] * case["headdim"]


def test_bench_cpu_varlen(tmp_path):
    path = tmp_path / "varlen.json"
    out = run("-m", "cupyflash.bench", "--cpu", "--varlen", "--modes", "fwd", "--causal", "true", "--repeats", "1",
              "--json", str(path), cwd=tmp_path)
    assert "cupyflash-padded" in out, out
    import json

    (case,) = json.loads(path.read_text())["cases"]
    lengths = case["lengths"]
    assert len(lengths) == case["batch"] == 8 and case["seqlen"] == max(lengths)
    # credited the real pairs only: 4 * nheads * headdim * sum(L^2) / 2
    assert case["flops"] == 4 * case["nheads"] * case["headdim"] * sum(n * n for n in lengths) / 2
    assert all(case["results"][impl]["status"] == "ok" for impl in ("cupyflash", "cupyflash-padded", "cupyflash-dense"))
    assert "cupyflash-dense" in out, out


def test_gpu_examples_skip_cleanly_or_run(tmp_path):
    # Without a GPU these print a one-line skip and exit 0; with one they run their checks.
    run(os.path.join(EXAMPLES, "interop.py"), cwd=tmp_path, timeout=300)
    run(os.path.join(EXAMPLES, "long_context.py"), "--seqlen", "16384", cwd=tmp_path, timeout=300)


def test_bench_variant_table_shows_each_sides_clock():
    from cupyflash import bench

    case = bench.Case("fwd", False, 64, 256, 1, 2, 2, "float16", bench.Variant("softcap", 30.0))
    row = {bench.PLAIN: bench.Result("ok", 1.0, 1.0, 0, sm_mhz=1635.4),
           "cupyflash": bench.Result("ok", 1.1, 1.0, 0, sm_mhz=1755.0)}
    table = bench.format_variant_table([case], [row], {})
    assert "SM MHz" in table and "1635" in table and "1755" in table and "1.100" in table, table
    row = {impl: dataclasses.replace(r, sm_mhz=None) for impl, r in row.items()}  # the NumPy backend reads none
    assert "1635" not in bench.format_variant_table([case], [row], {})
