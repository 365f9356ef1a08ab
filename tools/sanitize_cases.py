"""A small case of every kernel family and dtype, for compute-sanitizer (tools/gpu_validate.sh).

Covers the tensor-core forward (16-bit; vector and element loads), the CUDA-core forward
(float32, float64) and the three backward kernels, causal and not, with GQA and ragged tiles.
"""
import cupy as cp
import ml_dtypes
import numpy as np

import cupyflash

rng = np.random.default_rng(0)
for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
    for headdim in (64, 59, 160):  # vector loads; element loads; CUDA-core dK/dV for 16-bit
        for causal in (False, True):
            q, k, v, dout = (cp.asarray(rng.standard_normal(shape).astype(dtype).view(f"u{np.dtype(dtype).itemsize}"))
                             .view(dtype) for shape in [(1, 70, 4, headdim), (1, 90, 2, headdim),
                                                        (1, 90, 2, headdim), (1, 70, 4, headdim)])
            out, lse = cupyflash.attention(q, k, v, causal=causal, return_lse=True)
            cupyflash.attention_backward(dout, q, k, v, out, lse, causal=causal)
cp.cuda.Device().synchronize()
print("sanitize cases: done")
