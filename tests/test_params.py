"""The NumPy mirrors of the kernels' parameter structs (cupyflash/_cuda_backend.py) match the C
structs of cuda_src/params.cuh: the same fields in the same order (no GPU needed); on the device,
every offset and size, and a struct passed by value arrives intact."""
import re

import numpy as np
import pytest

pytest.importorskip("cupy", reason="cupy is not installed (pip install '.[cuda12]' or '.[cuda13]')")
nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from cupyflash import _cuda_backend  # noqa: E402

STRUCTS = {"VariantParams": _cuda_backend.VARIANT_PARAMS, "FwdParams": _cuda_backend.FWD_PARAMS,
           "BwdParams": _cuda_backend.BWD_PARAMS, "FwdParamsSm90": _cuda_backend.FWD_PARAMS_SM90,
           "DecodeParams": _cuda_backend.DECODE_PARAMS, "BwdParamsSm90": _cuda_backend.BWD_PARAMS_SM90,
           "RowFlags": _cuda_backend.ROW_FLAGS, "NonfiniteParams": _cuda_backend.NONFINITE_PARAMS}


@pytest.mark.gpu
def test_layouts_match_on_the_device():
    """Each field's offset and size and each struct's size, as the device compiler lays them out."""
    import cupy as cp

    probes = [(struct, name) for struct, dtype in STRUCTS.items() for name in dtype.names]
    body = "\n".join(f"    out[{3 * n}] = (unsigned long long)&((({s}*)nullptr)->{f});\n"
                     f"    out[{3 * n + 1}] = sizeof((({s}*)nullptr)->{f});\n    out[{3 * n + 2}] = sizeof({s});"
                     for n, (s, f) in enumerate(probes))
    code = _cuda_backend.source("params.cuh") + (
        'extern "C" __global__ void layout(unsigned long long* out) {\n' + body + "\n}\n")
    out = cp.zeros(3 * len(probes), cp.uint64)
    cp.RawModule(code=code, options=("-std=c++17",)).get_function("layout")((1,), (1,), (out,))
    got = out.get().reshape(-1, 3)
    for (struct, name), (offset, size, total) in zip(probes, got):
        field, want_offset = STRUCTS[struct].fields[name][:2]
        assert (offset, size, total) == (want_offset, field.itemsize, STRUCTS[struct].itemsize), (struct, name)


def test_every_c_field_is_mirrored():
    """Each struct field in params.cuh has a NumPy field of the same name, in the same order."""
    text = _cuda_backend.source("params.cuh")
    for struct, dtype in STRUCTS.items():
        body = re.sub(r"//[^\n]*|\[\w*\]", "", re.search(r"struct %s \{(.*?)\n\};" % struct, text, re.S).group(1))
        names = []
        for decl in filter(None, (" ".join(d.split()) for d in body.split(";"))):
            first, *rest = decl.split(",")  # "type name1, name2"
            names += [re.findall(r"\w+", part)[-1] for part in (first, *rest)]
        assert list(dtype.names) == names, struct


@pytest.mark.gpu
def test_struct_reaches_the_device_intact():
    """A kernel copies each 8-byte word of a BwdParams it received by value back to memory."""
    import cupy as cp

    code = _cuda_backend.source("params.cuh") + """
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
