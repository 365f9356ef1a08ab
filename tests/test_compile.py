"""Every kernel instantiation the dispatcher can ask for compiles with NVRTC, for sm_80 and
sm_90, without warnings. Needs NVRTC (pip: nvidia-cuda-nvrtc-cu12) but no GPU."""
import collections

import pytest

pytest.importorskip("cupy", reason="cupy is not installed (pip install '.[test]')")
nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from cupyflash import _cuda_backend, _plan  # noqa: E402

LAUNCHES = collections.defaultdict(list)
for launch in _plan.all_launches():
    LAUNCHES[launch.source].append(launch.name)


def test_table_covers_every_kernel_family():
    assert set(LAUNCHES) == {"forward.cu", "forward_mma.cu", "backward.cu", "backward_mma.cu"}
    names = [n for names in LAUNCHES.values() for n in names]
    for family in ("flash_fwd_mma<half_t", "flash_fwd_mma<bfloat16_t", "flash_fwd_simt<float,",
                   "flash_fwd_simt<double,", "flash_bwd_delta<", "flash_bwd_dkdv_simt<", "flash_bwd_dq_simt<",
                   "flash_bwd_dkdv_mma<half_t", "flash_bwd_dkdv_mma<bfloat16_t", "flash_bwd_dq_mma<half_t",
                   "flash_bwd_dq_mma<bfloat16_t"):
        assert any(n.startswith(family) for n in names), family


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(LAUNCHES))
def test_compiles_without_warnings(source, arch):
    program = nvrtc.createProgram(_cuda_backend.source(source), source, [], [])
    names = LAUNCHES[source]
    for name in names:
        nvrtc.addNameExpression(program, name)
    try:
        nvrtc.compileProgram(program, [*_cuda_backend.OPTIONS, f"-arch={arch}"])
    except nvrtc.NVRTCError:
        pytest.fail(f"{source} for {arch}:\n{nvrtc.getProgramLog(program)}")
    log = nvrtc.getProgramLog(program).strip("\x00").strip()
    assert "warning" not in log.lower(), log
    for name in names:
        assert nvrtc.getLoweredName(program, name)
    assert len(nvrtc.getCUBIN(program)) > 0
