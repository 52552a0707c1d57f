"""What the numba.cuda kernels share: the launch counter, and sums across a warp or a block.

Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, how CI runs these kernels) has no warp shuffles, so `warp_sum`
goes through shared memory there and through shfl_xor on a GPU: the one place the simulated code differs from the
GPU's, and bench/gpu_check.py runs the kernel tests on a real GPU too. Every thread of a block must call the
sums (they synchronize).
"""
from numba import cuda, float32

WARP = 32
SHUFFLE = hasattr(cuda, "shfl_xor_sync")   # False under the simulator
LAUNCHES = [0]   # kernel launches so far (the backend reports launches per token from it)


def launch(kernel, grid, block, *args):
    LAUNCHES[0] += 1
    kernel[grid, block](*args)


if SHUFFLE:
    @cuda.jit(device=True)
    def warp_sum(v, red, tid):
        # the sum of v over the warp, in lane 0 (in every lane here; red unused)
        off = 16
        while off > 0:
            v += cuda.shfl_xor_sync(0xffffffff, v, off)
            off //= 2
        return v

    @cuda.jit(device=True)
    def warp_sums(acc, n, red, tid):
        # acc[:n] (a local array) summed over the warp, in lane 0 (in every lane here; red unused)
        for i in range(n):
            acc[i] = warp_sum(acc[i], red, tid)

    warp_allsums = warp_sums
else:
    @cuda.jit(device=True)
    def warp_sum(v, red, tid):
        # the sum of v over the warp, in lane 0; red: float32 shared [block threads]
        red[tid] = v
        cuda.syncthreads()
        if tid % WARP == 0:
            for i in range(1, WARP):
                v += red[tid + i]
        cuda.syncthreads()
        return v

    @cuda.jit(device=True)
    def warp_sums(acc, n, red, tid):
        # acc[:n] (a local array) summed over the warp, in lane 0; red: float32 shared [n, block threads].
        # One barrier for all n sums: the simulator's cost is its barriers
        for i in range(n):
            red[i, tid] = acc[i]
        cuda.syncthreads()
        if tid % WARP == 0:
            for i in range(n):
                s = acc[i]
                for j in range(1, WARP):
                    s += red[i, tid + j]
                acc[i] = s
        cuda.syncthreads()

    @cuda.jit(device=True)
    def warp_allsums(acc, n, red, tid):
        # acc[:n] summed over the warp, in every lane: lane 0 sums, the others read its sums back
        warp_sums(acc, n, red, tid)
        lane = tid % WARP
        if lane == 0:
            for i in range(n):
                red[i, tid] = acc[i]
        cuda.syncthreads()
        for i in range(n):
            acc[i] = red[i, tid - lane]
        cuda.syncthreads()


@cuda.jit(device=True)
def block_sum(v, red, tid, nthreads):
    # the sum of v over the block (nthreads a multiple of 32, at most 32 warps), in every thread; red: float32
    # shared [nthreads]
    s = warp_sum(v, red, tid)
    if tid % WARP == 0:
        red[tid // WARP] = s
    cuda.syncthreads()
    t = float32(0.0)
    for i in range(nthreads // WARP):
        t += red[i]
    cuda.syncthreads()
    return t
