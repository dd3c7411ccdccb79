"""GPU training throughput of the per-worker LoRA loop (`services.trainer.train.train_loop_per_worker`),
run directly (no Ray: the device image has no ray), on a Llama-2-7B-shaped model with random weights.

Setting: bf16 base weights, LoRA r=8 alpha=16 on q_proj/v_proj, sequences of exactly 512 tokens
(fake teacher samples with long motivations, truncated at max_seq_len=512), AdamW (fused), cosine lr.
Throughput = tokens through the loop per second over whole optimizer steps (the loop's own timer:
collation, forward, backward, clipping, optimizer, all-reduce of counts), median over the steps after
warm-up. MFU = 6 * N * tokens/s / peak, N = all parameters (6.74 B), peak = 989 TFLOP/s (H100/H200 SXM
bf16 dense, datasheet); the table also gives it against 790 TFLOP/s, the bf16 matrix rate measured on these
machines (KINDS.md), which is the basis of the issue's reference (10.3 k tokens/s = 52 %).

Two steps, because the domain core needs pydantic, which the device image lacks:
  python benchmarks/bench_train_gpu.py --prepare .bench/gpu-train        # here (CPU): data + student dir
  python benchmarks/bench_train_gpu.py --data .bench/gpu-train [--variants NAME,...]   # on the GPU
Each variant runs in its own process (clean GPU memory); results go to $OUT/bench_train_gpu.json if $OUT is
set, and a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_SPEC = 989e12
PEAK_MEASURED = 790e12
SEQ = 512

# name -> (per_device_batch, grad_accum, extra loop config)
VARIANTS: dict[str, tuple[int, int, dict]] = {
    "mb8": (8, 8, {}),
    "mb16": (16, 4, {}),
    "mb8-compile": (8, 8, {"compile": True}),
    "mb16-compile": (16, 4, {"compile": True}),
    "mb32-compile": (32, 2, {"compile": True}),
    "mb4": (4, 16, {}),
}


def prepare(out: Path) -> None:
    from tomtransfer.services.trainer.dataset import export_training_set
    from tests.fixtures.synthetic_samples import bench_student_dir, fake_samples

    samples = fake_samples(families=["in_sample"], n=16, invalid_rate=0.0, motivation_words=400, seed=1)
    ex = export_training_set(samples, out / "data", targets="answer_motivation")
    bench_student_dir(out / "student")
    from transformers import AutoTokenizer

    from tomtransfer.services.trainer.train import DEFAULT_TRAINING, encode_example
    from tomtransfer.services.trainer.dataset import read_training_set

    # the loop's defaults come from TrainingConfig (pydantic), which the device image lacks: carried over in a file
    (out / "training_defaults.json").write_text(json.dumps(DEFAULT_TRAINING))

    tok = AutoTokenizer.from_pretrained(out / "student")
    lens = [len(e["input_ids"]) for r in read_training_set(ex.parquet)
            if (e := encode_example(tok, r["messages"], r["target"], SEQ)) is not None]
    print(f"prepared {out}: {ex.examples} examples, lengths min {min(lens)} max {max(lens)} (target {SEQ})")


def run_one(data: Path, name: str, steps: int) -> dict:
    import torch

    from tomtransfer.services.trainer.train import train_loop_per_worker

    per_device, accum, extra = VARIANTS[name]
    config = {
        "dataset_path": str(data / "data" / "train.parquet"),
        "student_path": str(data / "student"),
        "random_init": True,
        "use_gpu": True,
        "seed": 0,
        "max_steps": steps,
        "log_every_steps": 1,
        "probe_examples": 0,
        "output_dir": tempfile.mkdtemp(prefix="bench-gpu-"),
        "training": {**json.loads((data / "training_defaults.json").read_text()),
                     "per_device_batch_size": per_device, "effective_batch_size": per_device * accum,
                     "max_seq_len": SEQ, "epochs": 1000},
        **extra,
    }
    t0 = time.perf_counter()
    r = train_loop_per_worker(config)
    wall = time.perf_counter() - t0
    hist = r["history"]
    warm = 3 if extra.get("compile") else 2
    rates = [h["tokens_per_s"] for h in hist[warm:]]
    tps = statistics.median(rates)
    n = r["total_params"]
    return {
        "variant": name, "per_device": per_device, "grad_accum": accum, "tokens_per_step": per_device * accum * SEQ,
        "steps": len(hist), "tokens_per_s": tps, "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
        "mfu_989": 6 * n * tps / PEAK_SPEC, "mfu_790": 6 * n * tps / PEAK_MEASURED, "params": n,
        "trainable": r["trainable_params"], "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_first": r["loss_first"], "loss_last": r["loss_last"], "wall_s": wall,
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--variants", default="mb8,mb16,mb16-compile")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--one")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.data, args.one, args.steps)), flush=True)
        return
    results = []
    for name in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--one", name,
                               "--steps", str(args.steps)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stdout + proc.stderr)[-1500:]
            print(f"--- {name} failed (rc {proc.returncode}):\n{tail}", flush=True)
            results.append({"variant": name, "error": tail[-300:]})
            continue
        res = json.loads(line[7:])
        results.append(res)
        print(json.dumps(res), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_train_gpu.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'variant':14} {'mb':>3} {'acc':>3} {'tok/s':>8} {'MFU989':>7} {'MFU790':>7} {'mem GiB':>8} {'loss':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:14} FAILED")
            continue
        print(f"{r['variant']:14} {r['per_device']:3d} {r['grad_accum']:3d} {r['tokens_per_s']:8.0f} "
              f"{100 * r['mfu_989']:6.1f}% {100 * r['mfu_790']:6.1f}% {r['peak_mem_gib']:8.1f} "
              f"{r['loss_first']:5.2f}->{r['loss_last']:5.2f}")


if __name__ == "__main__":
    main()
