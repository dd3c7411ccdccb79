"""`make bench`: the CPU benchmarks, each writing a JSON under benchmarks/results/ (RESULTS.md explains them).

GPU benchmarks (bench_serving_gpu, bench_train_gpu) run on a GPU machine: `python -m benchmarks.bench_serving_gpu`
and `python -m benchmarks.bench_train_gpu` (see RESULTS.md for the commands and the numbers measured).
"""

from __future__ import annotations

import runpy
import sys

CPU_BENCHMARKS = ["benchmarks.bench_serving_cpu", "benchmarks.bench_train_cpu"]


def main() -> int:
    failed = []
    for name in sys.argv[1:] or CPU_BENCHMARKS:
        print(f"== {name}", flush=True)
        saved = sys.argv
        sys.argv = [name]
        try:
            runpy.run_module(name, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                failed.append(name)
        finally:
            sys.argv = saved
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
