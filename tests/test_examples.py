"""CPU smoke tests of the examples and of ``python -m cupyflash.bench`` (NumPy paths)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_quickstart_numpy():
    out = run(os.path.join(EXAMPLES, "quickstart.py"), "--numpy")
    errors = [float(e) for e in re.findall(r"max \|error\| vs float64 reference = (\S+)", out)]
    assert len(errors) == 4 and max(errors) < 1e-4, out


def test_train_transformer_tiny_loss_decreases():
    out = run(os.path.join(EXAMPLES, "train_transformer.py"), "--tiny", "--numpy", timeout=180)
    losses = [float(x) for x in re.findall(r"\| loss (\S+) \|", out)]
    assert len(losses) >= 3, out
    assert losses[-1] < losses[0] - 0.5, out
    assert "sample:" in out


def test_train_transformer_gradcheck():
    out = run(os.path.join(EXAMPLES, "train_transformer.py"), "--gradcheck")
    assert "gradcheck PASSED" in out, out


def test_bench_cpu_quick(tmp_path):
    path = tmp_path / "bench.json"
    out = run("-m", "cupyflash.bench", "--cpu", "--quick", "--modes", "fwd,bwd", "--json", str(path))
    assert "cupyflash" in out and "naive" in out
    import json

    data = json.loads(path.read_text())
    assert data["environment"]["backend"] == "numpy"
    assert all(case["results"]["cupyflash"]["status"] == "ok" for case in data["cases"]), data["cases"]


def test_gpu_examples_skip_cleanly_or_run():
    # Without a GPU these print a one-line skip and exit 0; with one they run their checks.
    run(os.path.join(EXAMPLES, "interop.py"), timeout=300)
