"""The suite tests the installed package, and the install has what the kernels need.

The NVRTC test needs no GPU: it fails where the `cuda12`/`cuda13` extras left cupy without the
CUDA toolkit wheels (as plain cupy-cuda12x does on a driver-only machine).
"""
import importlib.metadata
import importlib.resources
import json
import pathlib
import urllib.parse
import urllib.request

import pytest

import cupyflash

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _editable_checkout():
    """The directory a pip editable install of cupyflash points to, or None."""
    for dist in importlib.metadata.distributions(name="cupyflash"):
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        if info.get("dir_info", {}).get("editable"):
            return pathlib.Path(urllib.request.url2pathname(urllib.parse.urlparse(info["url"]).path)).resolve()
    return None


def test_tests_import_the_installed_package():
    imported = pathlib.Path(cupyflash.__file__).resolve().parent
    assert imported != ROOT / "cupyflash" or _editable_checkout() == ROOT, (
        f"the tests imported cupyflash from the checkout ({imported}), not from an install: "
        'pip install ".[cuda12,test]" and run `pytest`; `python -m pytest` puts the working directory on sys.path'
    )


def test_package_data_is_installed():
    if _editable_checkout() is not None:
        pytest.skip("an editable install reads the checkout's files")
    package = importlib.resources.files("cupyflash")
    assert package.joinpath("py.typed").is_file()
    assert any(p.name.endswith(".cu") for p in importlib.resources.files("cupyflash.cuda_src").iterdir())


def test_nvrtc_loads_and_compiles_a_kernel():
    cupy = pytest.importorskip("cupy", reason='cupy is not installed (pip install ".[cuda12,test]")')
    from cupy_backends.cuda.libs import nvrtc

    assert cupy.cuda.nvrtc.getVersion() >= (12, 0)
    code = 'extern "C" __global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }'
    program = nvrtc.createProgram(code, "twice.cu", [], [])
    try:
        nvrtc.compileProgram(program, ["-arch=sm_80"])
        assert len(nvrtc.getCUBIN(program)) > 0
    finally:
        nvrtc.destroyProgram(program)
