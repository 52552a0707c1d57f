"""Cold start: where a first run's compile time goes, from Numba's own compile events.

    python bench/bench_compile.py --model DIR [--model DIR2 ...] [--cache DIR] [--top 25]

Runs `tinyhun.generate` (a short prompt, 4 tokens) on each model in turn in this process, with an empty Numba cache
(a fresh temporary folder unless --cache is given: give the same folder twice to time the cached start). For each
model it prints the wall time of load + first generate, and the dispatchers Numba compiled meanwhile, longest
first: `numba:compile` events (a dispatcher typing, lowering and optimizing one signature; times nest, a caller's
includes its callees') and the self time left after its callees.
"""
import argparse
import os
import sys
import tempfile
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--cache", help="Numba cache folder (default: a new, empty one)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--kv-dtype", default=None)
    ap.add_argument("--signatures", action="store_true", help="print each compile's argument types")
    args = ap.parse_args(argv)
    os.environ["NUMBA_CACHE_DIR"] = args.cache or tempfile.mkdtemp(prefix="tinyhun-compile-")

    from numba.core import event

    import tinyhun

    stack, done = [], []

    class Recorder(event.Listener):
        def on_start(self, ev):
            stack.append([ev.data["dispatcher"], ev.data["args"], time.perf_counter(), 0.0, 0.0])

        def on_end(self, ev):
            disp, sig, t0, children, llvm = stack.pop()
            took = time.perf_counter() - t0
            if stack:
                stack[-1][3] += took
            done.append((took, took - children, llvm, disp, sig))

    class LLVMRecorder(event.Listener):
        # time inside LLVM (optimizing, emitting machine code), charged to the dispatcher being compiled
        def on_start(self, ev):
            self.t0 = time.perf_counter()

        def on_end(self, ev):
            if stack:
                stack[-1][4] += time.perf_counter() - self.t0

    print(f"Numba cache: {os.environ['NUMBA_CACHE_DIR']}")
    with event.install_listener("numba:compile", Recorder()), \
            event.install_listener("numba:llvm_lock", LLVMRecorder()):
        for path in args.model:
            done.clear()
            t0 = time.perf_counter()
            kw = {"kv_dtype": args.kv_dtype} if args.kv_dtype else {}
            model = tinyhun.load(path, **kw)
            t1 = time.perf_counter()
            "".join(tinyhun.generate(model, "The capital of France is", max_tokens=4))
            t2 = time.perf_counter()
            total = sum(d[1] for d in done)
            print(f"\n{path}: load {t1 - t0:.1f} s, first generate {t2 - t1:.1f} s; "
                  f"{len(done)} compiles, {total:.1f} s compiling")
            print(f"LLVM: {sum(d[2] for d in done):.1f} s of it")
            print(f"{'total s':>8} {'self s':>7} {'LLVM s':>7}  dispatcher")
            for took, own, llvm, disp, sig in sorted(done, key=lambda d: -d[0])[:args.top]:
                name = getattr(disp, "py_func", disp)
                name = f"{name.__module__}.{name.__qualname__}" if hasattr(name, "__qualname__") else str(name)
                print(f"{took:8.2f} {own:7.2f} {llvm:7.2f}  {name} ({len(sig) if sig else 0} args)")
                if args.signatures:
                    print(f"{'':26}{sig}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
