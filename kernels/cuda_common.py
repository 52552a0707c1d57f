"""What the numba.cuda kernels share: the one launch function (its counter, its target stream, the capture of a
CUDA graph), and sums and maxima across a warp or a block.

Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, how CI runs these kernels) has no warp shuffles, so `warp_sum`
goes through shared memory there and through shfl_xor on a GPU: the one place the simulated code differs from the
GPU's, and bench/gpu_check.py runs the kernel tests on a real GPU too. Every thread of a block must call the
sums (they synchronize).
"""
import threading
from contextlib import contextmanager

from numba import cuda

WARP = 32
SHUFFLE = hasattr(cuda, "shfl_xor_sync")   # False under the simulator
LAUNCHES = [0]   # kernels run so far, a graph's counted as it replays (the backend reports launches per token)
GRAPH_LAUNCHES = [0]   # graphs launched so far: one host call each, however many kernels they hold
REPLAYED = [0]   # kernels of LAUNCHES that ran inside a graph
_target = threading.local()   # .to: this thread's stream, or the capture in progress


def launch(kernel, grid, block, *args):
    """kernel[grid, block] on this thread's stream (see `on`), or into the graph being captured (see `capture`)."""
    to = getattr(_target, "to", 0)
    if isinstance(to, Replay):
        to.launches.append((kernel, grid, block, args))
    else:
        kernel[grid, block, to](*args)
    LAUNCHES[0] += 1


@contextmanager
def on(stream):
    """Launches of this thread go to `stream` (a numba.cuda stream, or a graph builder) inside the block."""
    before = getattr(_target, "to", 0)
    _target.to = stream
    try:
        yield
    finally:
        _target.to = before


class Replay:
    """A CUDA graph's stand-in under the simulator (which has none): the captured launches, kernel and arguments,
    run again in order on the stream they were captured from. A graph replays exactly this (the same kernels on the
    same device pointers, nothing the host did between them), so a step that replays correctly here is one a graph
    can hold."""

    def __init__(self, stream):
        self.stream, self.launches = stream, []

    def __len__(self):
        return len(self.launches)

    def _run(self):
        for kernel, grid, block, args in self.launches:
            kernel[grid, block, self.stream](*args)

    def launch(self):
        """Every captured kernel, in order: one host call for a graph."""
        self._run()
        LAUNCHES[0] += len(self)
        REPLAYED[0] += len(self)
        GRAPH_LAUNCHES[0] += 1


class Graph(Replay):
    """A CUDA graph captured from a stream (cuda.core's graph builder, which numba-cuda launches into), launched on
    that stream (as cuda.core's Stream, wrapped once at capture)."""

    def __init__(self, graph, kernels, stream):
        self.graph, self.kernels, self.stream = graph, kernels, stream

    def __len__(self):
        return self.kernels

    def _run(self):
        self.graph.launch(self.stream)


def capture(fn, stream):
    """fn's kernel launches captured from `stream` (a numba.cuda stream), not run: a Graph (a Replay under the
    simulator) whose launch() runs them all on that stream with one host call. fn must launch through `launch` and
    do nothing else on the device (no copies, no allocation, no host reads), and must have run once already (so
    every kernel is compiled and loaded)."""
    before = LAUNCHES[0]
    if not SHUFFLE:
        graph = Replay(stream)
        with on(graph):
            fn()
    else:
        from cuda.core import Stream
        core = Stream.from_handle(int(stream.handle))
        builder = core.create_graph_builder()
        # relaxed (cuda.core's default): a call numba makes around a launch may not be capturable, but nothing
        # but launches changes the device here, which the simulator's Replay checks
        builder.begin_building("relaxed")
        try:
            with on(builder):
                fn()
        finally:
            builder.end_building()
        graph = Graph(builder.complete(), LAUNCHES[0] - before, core)
    LAUNCHES[0] = before   # captured, not run: counted as the graph runs
    return graph


def _reductions(combine):
    """(warp, block) reductions by a device function combine(a, b) (a sum, a max): the warp's in lane 0 (in every
    lane with shuffles), the block's in every thread (nthreads a multiple of 32, at most 32 warps). red: float32
    shared [block threads] (unused by a warp's shuffles); every thread of the block must call them."""
    if SHUFFLE:
        @cuda.jit(device=True)
        def warp(v, red, tid):
            off = 16
            while off > 0:
                v = combine(v, cuda.shfl_xor_sync(0xffffffff, v, off))
                off //= 2
            return v
    else:
        @cuda.jit(device=True)
        def warp(v, red, tid):
            red[tid] = v
            cuda.syncthreads()
            if tid % WARP == 0:
                for i in range(1, WARP):
                    v = combine(v, red[tid + i])
            cuda.syncthreads()
            return v

    @cuda.jit(device=True)
    def block(v, red, tid, nthreads):
        s = warp(v, red, tid)
        if tid % WARP == 0:
            red[tid // WARP] = s
        cuda.syncthreads()
        t = red[0]
        for i in range(1, nthreads // WARP):
            t = combine(t, red[i])
        cuda.syncthreads()
        return t
    return warp, block


@cuda.jit(device=True)
def _add(a, b):
    return a + b


@cuda.jit(device=True)
def _max(a, b):
    return max(a, b)


warp_sum, block_sum = _reductions(_add)
warp_max, block_max = _reductions(_max)

if SHUFFLE:
    @cuda.jit(device=True)
    def warp_sums(acc, n, red, tid):
        # acc[:n] (a local array) summed over the warp, in lane 0 (in every lane here; red unused)
        for i in range(n):
            acc[i] = warp_sum(acc[i], red, tid)

    warp_allsums = warp_sums
else:
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

