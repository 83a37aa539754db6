// Profiling helper: hold the stream for `cycles` clock cycles, so the host can enqueue a whole
// step behind it and per-kernel events then time the kernels back to back, free of launch gaps.
extern "C" __global__ void spin_wait(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}
