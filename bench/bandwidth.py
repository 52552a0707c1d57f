"""Shared bench helpers: the machine's DRAM read bandwidth, cache-cold operand cycles, and timing.

A memory-bound kernel is judged by GB/s against what this machine can read, measured in the same run, because
other jobs may share the cores. The reference is a STREAM-style read: every thread takes the max of its own slice
of one 1 GiB array with NumPy (which releases the GIL inside reductions), best of a few passes. max, not sum:
NumPy's pairwise float sum runs at ~22 GB/s per core from L2, too close to a core's share of DRAM; max runs at ~50.
"""
import os
import threading
import time

import numpy as np

L3_FALLBACK = 256 << 20


def l3_bytes():
    """Last-level cache size from sysfs (e.g. '266240K'), 256 MiB if unknown."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip()
    except OSError:
        return L3_FALLBACK
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def read_bandwidth(nbytes=1 << 30, threads=None, repeats=5):
    """Best bytes/s over `repeats` passes of `threads` threads each reading 1/threads of an nbytes array."""
    threads = threads or os.cpu_count()
    a = np.ones(nbytes // 8, np.float64)                  # ones, not empty: every page really exists
    parts = np.array_split(a, threads)
    best = np.inf
    for _ in range(repeats):
        workers = [threading.Thread(target=np.maximum.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


class BestBandwidth:
    """The best read bandwidth seen so far in this run; measure() adds a few passes first. Taking it again just
    before each kernel measurement keeps a busy moment at the start from flattering the later percentages."""

    def __init__(self):
        self.best = 0.0

    def measure(self, repeats=3):
        self.best = max(self.best, read_bandwidth(repeats=repeats))
        return self.best


def cold_copies(make, nbytes_each, factor=2):
    """Enough independent operands from make() that one cycle through them reads factor x L3 from DRAM."""
    return [make() for _ in range(max(2, -(-factor * l3_bytes() // nbytes_each)))]


def time_cycles(fn, items, cycles=5):
    """(best, median) over `cycles` passes through items of the mean seconds per fn(item). Best is the figure
    to set against the best bandwidth pass: on a shared machine a quiet moment shows what the hardware allows,
    and a whole cycle (tens of ms, like a bandwidth pass) is not flattered by one lucky short call."""
    fn(items[0])                                          # compile / warm the code, not the data
    means = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        means.append((time.perf_counter() - t0) / len(items))
    return min(means), float(np.median(means))
