"""The kernels compile with NVRTC, without warnings, for sm_80 and sm_90: the covering set of
instantiations of `_plan.covering_launches`, one NVRTC program per source file, options and
architecture, compiled in parallel processes. Needs cupy and NVRTC (pip install ".[cuda12,test]")
but no GPU."""
import collections
import concurrent.futures
import multiprocessing
import os
import re

import pytest

pytest.importorskip("cupy", reason='cupy is not installed (pip install ".[cuda12,test]")')
from cupy_backends.cuda.libs import nvrtc  # noqa: E402

from cupyflash import _csource, _cuda_backend, _plan  # noqa: E402

ARCHS = ("sm_80", "sm_90")
_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)")


def _programs():
    """{(source, options with the architecture): [name expressions]}."""
    programs = collections.defaultdict(list)
    for launch in _plan.covering_launches():
        if any(option.startswith(("-arch", "--gpu-architecture")) for option in launch.options):
            programs[(launch.source, launch.options)].append(launch.name)
        else:
            for arch in ARCHS:
                programs[(launch.source, (*launch.options, f"-arch={arch}"))].append(launch.name)
    return programs


PROGRAMS = _programs()


def _compile(source, code, options, names):
    """NVRTC log, error (None on success) and cubin size of one program; runs in a worker."""
    program = nvrtc.createProgram(code, source, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, list(options))
        except nvrtc.NVRTCError as exc:
            return nvrtc.getProgramLog(program), str(exc), 0
        for name in names:
            nvrtc.getLoweredName(program, name)  # raises if the name expression did not resolve
        return nvrtc.getProgramLog(program), None, len(nvrtc.getCUBIN(program))
    finally:
        nvrtc.destroyProgram(program)


@pytest.fixture(scope="module")
def compiled():
    """Futures of every program, submitted at once, the largest first so the slowest start early."""
    order = sorted(PROGRAMS, key=lambda key: -len(PROGRAMS[key]))
    with concurrent.futures.ProcessPoolExecutor(min(len(order), os.cpu_count() or 1),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        yield {key: pool.submit(_compile, key[0], _cuda_backend.source(key[0]), key[1], PROGRAMS[key])
               for key in order}


def test_every_kernel_is_instantiated():
    sources = _csource.source_dir()
    # Each .cu with its headers inlined: a kernel defined in a header counts for every file that includes it.
    kernels = {(file, name) for file in os.listdir(sources) if file.endswith(".cu")
               for name in _KERNEL.findall(_cuda_backend.source(file))}
    assert kernels, f"no __global__ function in {sources}"
    launched = {(source, name.split("<")[0].strip()) for (source, _), names in PROGRAMS.items() for name in names}
    assert not kernels - launched, f"(file, kernel) that no covering launch instantiates: {sorted(kernels - launched)}"


@pytest.mark.parametrize("key", sorted(PROGRAMS), ids=lambda key: f"{key[0]}[{' '.join(key[1])}]")
def test_compiles_without_warnings(compiled, key):
    log, error, cubin_bytes = compiled[key].result()
    log = log.strip("\x00").strip()
    assert error is None, f"{key[0]} {' '.join(key[1])}: {error}\n{log}"
    assert "warning" not in log.lower(), log
    assert cubin_bytes > 0


def test_wgmma_header_is_current():
    """cuda_src/wgmma.cuh is what tools/gen_wgmma.py writes."""
    import importlib.util

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("gen_wgmma", os.path.join(checkout, "tools", "gen_wgmma.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(os.path.join(checkout, "cuda_src", "wgmma.cuh")) as f:
        assert f.read() == gen.text()
