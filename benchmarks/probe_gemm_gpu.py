"""Probe: how fast are the decode step's weight products for M rows (Llama-2-7B shapes, bf16) on this GPU?

Prints microseconds per product for each M, per BLAS backend, and the per-step sum (32 layers + lm_head).
Used to decide whether padding the 300 sampling rows to a tile-friendly count pays off.
    python3 -m benchmarks.probe_gemm_gpu --rows 300,304,320,336,352,384
"""

from __future__ import annotations

import argparse
import json

import torch

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}


def bench(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1000  # us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="300,304,320,384")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    ws = {k: torch.randn(n, k_, device=dev, dtype=torch.bfloat16) * 0.02 for k, (k_, n) in SHAPES.items()}
    head = torch.randn(32000, 4096, device=dev, dtype=torch.bfloat16) * 0.02
    out: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for lib in ("cublas", "cublaslt"):
        try:
            torch.backends.cuda.preferred_blas_library(lib)
        except Exception as e:  # noqa: BLE001
            out[lib] = str(e)
            continue
        res = {}
        for m in [int(x) for x in args.rows.split(",")]:
            per = {}
            for k, w in ws.items():
                x = torch.randn(m, w.shape[1], device=dev, dtype=torch.bfloat16)
                per[k] = bench(lambda: torch.nn.functional.linear(x, w))
            x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
            per["lm_head"] = bench(lambda: torch.nn.functional.linear(x, head))
            step_ms = (32 * sum(v for k, v in per.items() if k != "lm_head") + per["lm_head"]) / 1000
            res[m] = {**{k: round(v, 1) for k, v in per.items()}, "step_ms": round(step_ms, 3),
                      "step_ms_per_row_x300": round(step_ms * 300 / m, 3)}
            print(lib, m, json.dumps(res[m]), flush=True)
        out[lib] = res
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
