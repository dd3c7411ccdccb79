"""`make bench`: the CPU benchmarks, each writing a JSON under benchmarks/results/ (RESULTS.md explains them).

GPU benchmarks run on a GPU machine (RESULTS.md has the commands and the numbers measured): bench_serving_gpu and
bench_train_gpu (no Ray), bench_train_gpu_ray and bench_serving_gpu_ray (Ray Train and Ray Serve), bench_protocol_gpu
(the paper's protocol end to end; the device calls as run: gpu_device_steps.sh).
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
