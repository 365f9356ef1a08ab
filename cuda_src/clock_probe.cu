// The benchmark's reading of the SM clock. Under a power cap the clock depends on the kernel that ran last
// (an H100 holds about 1.64 GHz under bfloat16 attention's sustained load and 1.76 GHz under a softcapped
// one's), so a time means little without the clock it ran at. One thread spins for `cycles` clocks of its
// multiprocessor and writes the clocks it counted and the nanoseconds of the global timer they took.

__device__ __forceinline__ unsigned long long sm_clock() {
    unsigned long long c;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(c));
    return c;
}

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__global__ void sm_clock_probe(unsigned long long cycles, unsigned long long* __restrict__ out) {
    const unsigned long long c0 = sm_clock(), t0 = global_ns();
    unsigned long long c1 = c0;
    while (c1 - c0 < cycles) c1 = sm_clock();
    out[1] = global_ns() - t0;
    out[0] = c1 - c0;
}
