"""CPU training throughput: the LoRA loop through Ray Train vs. a plain single-process peft loop, same data.

Arms (same training set, same model, same LoRA r=8 q/v, same micro-batch and grad accumulation, 1 epoch):
- reference   a minimal plain peft loop written here (HF `labels=` loss, AdamW, no Ray, no MLflow);
- loop        `services.trainer.train.train_loop_per_worker` called directly (world size 1);
- ray_1x1     the same loop through Ray Train `TorchTrainer`, 1 worker (1 CPU): Ray Train's own overhead;
- ray_2x1     2 workers x 1 CPU each (DDP over gloo);
- loop_bf16   `loop` with `training.dtype: bfloat16` (bf16 base, fp32 LoRA weights, bf16 autocast): on a CPU with
              AMX / AVX512-BF16 (this machine) the step time halves on a real-sized student (`--student`).
Every process uses one torch thread: on a shared, oversubscribed 2-core machine multi-threaded OpenMP
regions stall on each other and the numbers become meaningless (seen here: 2 threads ran 6x slower than
two 1-thread workers). Arms are interleaved over `--repeat` rounds and the median is reported.
Tokens/s counts every non-pad token through the model, over the training loop only (setup excluded;
`tokens_per_s_avg` of the loop's result); tokens per CPU-second (rank 0's process CPU time in the loop) is
the measure that survives other people's load on the machine. The end-to-end wall of each arm (worker
start, model load, checkpoints) is reported beside it. Ratio = arm / reference.

Model: a Llama-architecture random-weight student (hidden 256, 4 layers, 8 heads, MLP 688; tokenizer =
tests.fixtures.tiny_models's, so prompts are ~600-700 tokens). The machine is shared: load averages before and
after each arm are recorded. Ray starts inside a private network namespace (the script re-executes itself
under scripts/in-netns when a non-loopback interface is up).

`--student ALIAS` trains a real model of the offline store instead (e.g. smollm2-135m-instruct).

Run: `.venv/bin/python -m benchmarks.bench_train_cpu [--out FILE] [--examples 32] [--student ALIAS] [--arms ...]`
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["IR_prison", "biz_staghunt", "team_snowdrift", "environment_delight"]
PER_DEVICE, EFFECTIVE = 4, 16


def _loopback_only() -> bool:
    return all(name == "lo" for _, name in socket.if_nameindex()) or os.environ.get("TOMTRANSFER_NETNS") == "1"


def reference_loop(dataset: Path, student: Path, threads: int) -> dict:
    """The plain baseline: tokenize like the trainer, then the textbook peft loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tomtransfer.services.trainer.dataset import read_training_set
    from tomtransfer.services.trainer.train import collate, encode_example

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(student)
    examples = [encode_example(tok, r["messages"], r["target"], 1024) for r in read_training_set(dataset)]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0)
    accum = EFFECTIVE // PER_DEVICE
    order = torch.randperm(len(examples)).tolist()
    tokens, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    model.train()
    for i in range(0, len(order), PER_DEVICE):
        b = collate([examples[j] for j in order[i : i + PER_DEVICE]], tok.pad_token_id)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        (out.loss / accum).backward()
        tokens += int(b["attention_mask"].sum())
        if (i // PER_DEVICE + 1) % accum == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"tokens": tokens, "loop_s": dt, "tokens_per_s": tokens / dt, "tokens_per_cpu_s": tokens / cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--examples", type=int, default=16, help="training examples (spread over 4 scenarios)")
    ap.add_argument("--arms", default="reference,loop,ray_1x1,ray_2x1")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; arms interleaved; the median is reported")
    ap.add_argument("--student", help="a model alias or folder to train instead of the tiny random Llama")
    args = ap.parse_args()
    if not _loopback_only():
        os.execv(str(ROOT / "scripts" / "in-netns"),
                 [str(ROOT / "scripts" / "in-netns"), sys.executable, "-m", "benchmarks.bench_train_cpu", *sys.argv[1:]])

    from tests.fixtures.tiny_models import build_tiny_model
    from tomtransfer.services.trainer.dataset import export_training_set
    from tests.fixtures.synthetic_samples import fake_samples
    from tomtransfer.services.trainer.train import resolve_student, train_loop_per_worker
    from tomtransfer.shared.config import parse_config

    work = Path(tempfile.mkdtemp(prefix="bench-train-cpu-"))
    per = max(1, args.examples // len(SCENARIOS))
    ds = export_training_set(fake_samples(SCENARIOS, n=per, invalid_rate=0.0, seed=2), work / "ds",
                             targets="answer_motivation").parquet
    student = resolve_student(args.student) if args.student else build_tiny_model(
        work / "student", arch="llama", seed=0, hidden_size=256, layers=4, heads=8, kv_heads=4, intermediate=688)
    runs: dict[str, list[dict]] = {}

    def loop(dtype: str = "auto"):
        r = train_loop_per_worker({"dataset_path": str(ds), "student_path": str(student), "num_threads": 1,
                                   "probe_examples": 0, "output_dir": str(work / "loop"),
                                   "training": {"epochs": 1, "per_device_batch_size": PER_DEVICE,
                                                "effective_batch_size": EFFECTIVE, "dtype": dtype}})
        return {"tokens": r["loop_tokens"], "loop_s": r["loop_s"], "tokens_per_s": r["tokens_per_s_avg"],
                "tokens_per_cpu_s": r["loop_tokens"] / r["loop_cpu_s_rank0"], "loss_last": r["loss_last"]}

    def ray_arm(workers: int):
        def go():
            from tomtransfer.services.trainer.train import run_training

            name = f"bench-{workers}x1-{len(runs.get(f'ray_{workers}x1', []))}"
            cfg = parse_config({"name": name, "output_dir": str(work / "runs"),
                                "models": {"teacher": {"model": "t"}, "student": {"model": str(student)}},
                                "training": {"epochs": 1, "per_device_batch_size": PER_DEVICE,
                                             "effective_batch_size": EFFECTIVE, "num_workers": workers,
                                             "cpus_per_worker": 1, "max_failures": 0}})
            r = run_training(cfg, ds, student, None, extra_loop_config={"probe_examples": 0})
            # rank 0 processed 1/workers of the tokens with its CPU time
            return {"tokens": r["loop_tokens"], "loop_s": r["loop_s"], "tokens_per_s": r["tokens_per_s_avg"],
                    "tokens_per_cpu_s": r["loop_tokens"] / workers / r["loop_cpu_s_rank0"]}

        return go

    arms = {"reference": lambda: reference_loop(ds, student, 1), "loop": loop, "ray_1x1": ray_arm(1),
            "ray_2x1": ray_arm(2), "loop_bf16": lambda: loop("bfloat16")}
    names = args.arms.split(",")
    import ray

    if any(n.startswith("ray") for n in names):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="/tmp/rb"))
    try:
        for round_ in range(args.repeat):
            for name in names:
                load0 = os.getloadavg()[0]
                t0 = time.perf_counter()
                r = arms[name]()
                r["wall_s"] = time.perf_counter() - t0
                r["load_before"], r["load_after"] = load0, os.getloadavg()[0]
                runs.setdefault(name, []).append(r)
                print(f"round {round_} {name:10} {r['tokens_per_s']:7.0f} tok/s  {r['tokens_per_cpu_s']:7.0f} "
                      f"tok/cpu-s  loop {r['loop_s']:6.1f}s  wall {r['wall_s']:6.1f}s  "
                      f"load {load0:.1f}->{r['load_after']:.1f}", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()

    def med(xs):
        return statistics.median(xs)

    summary = {name: {k: med([r[k] for r in rs]) for k in ("tokens_per_s", "tokens_per_cpu_s", "loop_s", "wall_s")}
               for name, rs in runs.items()}
    if "reference" in summary:
        for k in ("tokens_per_s", "tokens_per_cpu_s"):
            base = summary["reference"][k]
            for v in summary.values():
                v[f"{k}_ratio"] = v[k] / base
    out = {"examples": args.examples, "student": args.student or "tiny random Llama", "cpus": os.cpu_count(), "threads_per_process": 1, "per_device": PER_DEVICE,
           "effective": EFFECTIVE, "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    print(f"\n{'arm':10} {'tok/s':>8} {'ratio':>6} {'tok/cpu-s':>10} {'ratio':>6} {'wall s':>7}")
    for name, v in summary.items():
        print(f"{name:10} {v['tokens_per_s']:8.0f} {v.get('tokens_per_s_ratio', 0):6.2f} "
              f"{v['tokens_per_cpu_s']:10.0f} {v.get('tokens_per_cpu_s_ratio', 0):6.2f} {v['wall_s']:7.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
