"""FastDiv (cuda_src/common.cuh), the division of the Hopper forward's work tiles by divisors fixed for a
kernel: on the device, against NumPy's floor division, for every divisor up to 1024, the powers of two and
their neighbours, and random ones, over dividends from 0 to 2^31 - 1."""
import numpy as np
import pytest

PROBE = """
extern "C" __global__ void fastdiv_probe(const int* divisors, const int* dividends, int* quotients, int n_divisors,
                                         int n_dividends) {
    const int d = blockIdx.y;
    if (d >= n_divisors) return;
    const FastDiv div(divisors[d]);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_dividends; i += gridDim.x * blockDim.x)
        quotients[d * n_dividends + i] = div.div(dividends[i]);
}
"""


@pytest.mark.gpu
def test_quotients_equal_floor_division():
    import cupy

    from cupyflash import _csource, _plan

    rng = np.random.default_rng(0)
    powers = [1 << k for k in range(31)]
    divisors = np.unique(np.concatenate([np.arange(1, 1025), powers, np.array(powers[1:]) - 1,
                                         np.array(powers[:-1]) + 1, rng.integers(1, 2**31, 500)]))
    dividends = np.unique(np.concatenate([np.arange(0, 2000), np.array(powers) - 1, powers, 2**31 - np.arange(1, 100),
                                          rng.integers(0, 2**31, 3000)])).astype(np.int32)
    module = cupy.RawModule(code=_csource.source("common.cuh") + PROBE, options=_plan.OPTIONS)
    kernel = module.get_function("fastdiv_probe")
    shape = (divisors.size, dividends.size)
    quotients = cupy.full(shape, -1, np.int32)
    kernel((16, divisors.size), (256,), (cupy.asarray(divisors.astype(np.int32)), cupy.asarray(dividends), quotients,
                                         np.int32(divisors.size), np.int32(dividends.size)))
    np.testing.assert_array_equal(quotients.get(), dividends[None, :].astype(np.int64) // divisors[:, None])
