"""`tomtransfer train`'s recipe through Ray Train on GPUs (NCCL, `use_gpu: true`) vs the plain per-worker loop.

What runs is the product: `services.trainer.train.run_training` (TorchTrainer, NCCL, FailureConfig, checkpoints)
with `configs/gpu.yaml`, on a Llama-2-7B-shaped student (random bf16 weights drawn on the GPU, the stand-in
tokenizer, the paper's LoRA r=8 alpha=16 on q_proj/v_proj) and 6000 training examples of realistic length
(20 in-sample scenarios x 300 motivated samples, motivations of 40-200 words, padded per micro-batch).

Phases (each appends records to $OUT/gpu_ray_train.json as soon as it ends, so a timeout keeps what finished):
  plain     train_loop_per_worker called directly, 1 GPU (no Ray)             -> tokens/s, MFU
  plain_compile  the same with `training.compile: true` (shapes vary per micro-batch) -> tokens/s, step times
  ray1      run_training, 1 worker x 1 GPU                                    -> tokens/s, MFU, vs plain
  ray2      run_training, 2 workers x 1 GPU (DDP over NCCL)                   -> tokens/s, MFU, scaling 1 -> 2
  rayN      the same with N workers (4, 8, ...; the effective batch held at 64) -> scaling 1 -> N, loss curve vs ray1
  ref       2 workers, `--short` steps uninterrupted, checkpoint every 2 steps, twice -> the reference adapter
            and the GPU's run-to-run noise (on the H200s two identical runs' step-2 losses differed by 4e-4)
  resume    2 workers: rank 0 fails after step 4 (max_failures 0), then the same run again -> resumes there
  fault     2 workers: rank 1 SIGKILLs itself after step 3, FailureConfig restarts the group at step 2
Tokens/s = the loop's own per-step windows (global tokens / wall time of the step, all ranks), median over the
steps after 2 warm-up steps. MFU = 6 * N * tokens/s / (989 TFLOP/s x GPUs) (N = all 6.74 B parameters).

  .venv/bin/python -m benchmarks.bench_train_gpu_ray --prepare build/gpu-ray          # here (CPU)
  python3 -m benchmarks.bench_train_gpu_ray --data build/gpu-ray --phases plain       # device, no ray needed
  python3 -m benchmarks.bench_train_gpu_ray --data build/gpu-ray --phases ray1,ray2,ref,resume,fault

On the device tool (ray is not on its image; benchmarks/RESULTS.md, "The GPU path through Ray (H200)", has the
wheel list and the two-call install). CPU dry run: TOMTRANSFER_BENCH_SMOKE=1 scripts/in-netns ... (a tiny
student, gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK = 989e12
WARMUP = 2
MOTIVATION_WORDS = (40, 80, 120, 160, 200)  # 60 samples each per scenario: 300 per scenario


def prepare(out: Path) -> None:
    import pandas as pd

    from tomtransfer.services.trainer.dataset import export_training_set
    from tests.fixtures.synthetic_samples import bench_student_dir, fake_samples

    parts = [fake_samples(families=["in_sample"], n=300 // len(MOTIVATION_WORDS), invalid_rate=0.0,
                          motivation_words=w, seed=i + 1) for i, w in enumerate(MOTIVATION_WORDS)]
    samples = pd.concat(parts, ignore_index=True)
    samples["sample_index"] = samples.groupby("scenario_id").cumcount()
    samples["seed"] = range(len(samples))
    ex = export_training_set(samples, out / "data", name="gpu", targets="answer_motivation")
    for extra in ("train_alpaca.json", "train_sharegpt.json"):  # 34 MB the device does not need (64 MiB a call)
        (out / "data" / extra).unlink(missing_ok=True)
    bench_student_dir(out / "student")
    from transformers import AutoTokenizer

    from tomtransfer.services.trainer.dataset import read_training_set
    from tomtransfer.services.trainer.train import encode_example

    tok = AutoTokenizer.from_pretrained(out / "student")
    t0 = time.perf_counter()
    lens = sorted(len(e["input_ids"]) for r in read_training_set(ex.parquet)
                  if (e := encode_example(tok, r["messages"], r["target"], 1024)) is not None)
    stats = {"examples": ex.examples, "tokens": sum(lens), "len_min": lens[0], "len_median": lens[len(lens) // 2],
             "len_max": lens[-1], "tokenize_s_here": time.perf_counter() - t0}
    (out / "data_stats.json").write_text(json.dumps(stats, indent=1))
    print(f"prepared {out}: {stats}")


SMOKE = os.environ.get("TOMTRANSFER_BENCH_SMOKE") == "1"  # CPU dry run: a tiny student, gloo, no GPU


def _student(data: Path) -> Path:
    if SMOKE:
        from tests.fixtures.tiny_models import tiny_model_dir

        return tiny_model_dir()
    return data / "student"


def _config(data: Path, out_dir: Path, workers: int, max_failures: int = 1):
    from tomtransfer.shared.config import load_config

    cfg = load_config(ROOT / "configs" / "gpu.yaml")
    t = cfg.training
    # the effective batch stays the paper's 64 whatever the number of workers: fewer accumulation steps first,
    # then (past 64 / 16 = 4 workers) smaller micro-batches
    per_device = max(1, min(t.per_device_batch_size, t.effective_batch_size // workers))
    t = t.model_copy(update={"num_workers": workers, "max_failures": max_failures, "per_device_batch_size": per_device})
    if SMOKE:
        t = t.model_copy(update={"use_gpu": False, "cpus_per_worker": 1, "per_device_batch_size": 4})
    student = cfg.models.student.model_copy(update={"model": str(_student(data))})
    return cfg.model_copy(update={"training": t, "output_dir": out_dir,
                                  "models": cfg.models.model_copy(update={"student": student})})


def _rates(history: list[dict]) -> dict:
    rates = [h["tokens_per_s"] for h in history[WARMUP:]] or [h["tokens_per_s"] for h in history]
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_min": min(rates),
            "tokens_per_s_max": max(rates), "steps_timed": len(rates)}


def _mfu(tps: float, params: int, gpus: int) -> float:
    return 6 * params * tps / (PEAK * gpus)


def phase_plain(data: Path, steps: int, compile: bool = False) -> dict:
    import torch

    from tomtransfer.services.trainer.train import train_loop_per_worker

    cfg = _config(data, Path(tempfile.mkdtemp()), 1)
    t0 = time.perf_counter()
    r = train_loop_per_worker({
        "dataset_path": str(data / "data" / "train.parquet"), "student_path": str(_student(data)),
        "training": cfg.training.model_dump(mode="json"), "use_gpu": not SMOKE, "seed": 0, "random_init": not SMOKE,
        "max_steps": steps, "log_every_steps": 1, "probe_examples": 0, "output_dir": tempfile.mkdtemp(),
        # the loop reads compile at the top level, as run_training passes it (training.compile)
        "compile": compile})
    rec = {"phase": "plain_compile" if compile else "plain", "gpus": 1, "steps": r["step"],
           "wall_s": time.perf_counter() - t0,
           **_rates(r["history"]), "params": r["total_params"], "trainable": r["trainable_params"],
           "examples": r["examples"], "loss_first": r["loss_first"], "loss_last": r["loss_last"],
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if not SMOKE else None,
           "history": r["history"]}
    rec["mfu_989"] = _mfu(rec["tokens_per_s"], rec["params"], 1)
    return rec


def _ray_run(data: Path, name: str, workers: int, steps: int, out_dir: Path, *, ckpt: int = 0,
             max_failures: int = 1, fault: dict | None = None) -> dict:
    import torch

    from tomtransfer.services.trainer.train import STATE_FILE, run_training

    cfg = _config(data, out_dir, workers, max_failures)
    extra = {"random_init": not SMOKE, "max_steps": steps, "log_every_steps": 1, "probe_examples": 0}
    if fault:
        extra["fault"] = fault
    t0 = time.perf_counter()
    r = run_training(cfg, data / "data" / "train.parquet", _student(data), None,
                     checkpoint_every_steps=ckpt, extra_loop_config=extra)
    wall = time.perf_counter() - t0
    state = torch.load(Path(r["checkpoint_path"]) / STATE_FILE, map_location="cpu", weights_only=False)
    rec = {"phase": name, "gpus": workers, "steps": r["step"], "start_step": r["start_step"], "wall_s": wall,
           "fit_wall_s": r["wall_s"], "loop_s": r["loop_s"], "adapter_checksums": r["adapter_checksums"],
           "adapters_identical": r["adapters_identical"], "adapter_dir": r["adapter_dir"],
           "resumed_run": r["resumed_run"], "loss_last": r["loss"], "params": r["total_params"],
           "examples": r["examples"], "history": state["history"], **_rates(state["history"])}
    rec["mfu_989"] = _mfu(rec["tokens_per_s"], rec["params"], workers)
    return rec


def _ray_workers(phase: str) -> int | None:
    """`ray<N>`: run_training with N workers x 1 GPU (any N the machine has)."""
    return int(phase[3:]) if phase.startswith("ray") and phase[3:].isdigit() and int(phase[3:]) > 0 else None


def _loss_curves(a: list[dict], b: list[dict]) -> dict:
    """Two runs' per-step losses side by side (the same effective batch and schedule; a different number of workers
    shards and pads the examples differently, so the curves agree up to that sampling noise, not bit for bit)."""
    la, lb = ({h["step"]: h["loss"] for h in x} for x in (a, b))
    common = sorted(set(la) & set(lb))
    diffs = [abs(la[s] - lb[s]) for s in common]
    return {"steps": len(common), "max_abs_diff": max(diffs, default=None),
            "mean_abs_diff": sum(diffs) / len(diffs) if diffs else None,
            "last": [la[common[-1]], lb[common[-1]]] if common else None}


def _adapter_diff(a: str, b: str) -> dict:
    """Max abs and relative L2 difference of two adapters' weights (Adam moves near-zero-gradient weights by
    about lr per step whatever the gradient's size, so max abs alone overstates GPU noise)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(Path(a) / "adapter_model.safetensors")), load_file(str(Path(b) / "adapter_model.safetensors"))
    dx = torch.cat([(x[k].float() - y[k].float()).flatten() for k in sorted(x)])
    ny = torch.cat([y[k].float().flatten() for k in sorted(y)])
    return {"max_abs": float(dx.abs().max()), "rel_l2": float(dx.norm() / ny.norm())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--phases", default="plain")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of the throughput phases")
    ap.add_argument("--short", type=int, default=6, help="optimizer steps of the ref/resume/fault phases")
    ap.add_argument("--compile-steps", type=int, default=20, help="optimizer steps of plain_compile (its first "
                    "steps compile, then recompile once with dynamic shapes)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_ray_train.json")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare)
    data = args.data.resolve()
    records = json.loads(args.out.read_text()) if args.out.is_file() else []

    def keep(rec: dict) -> None:
        records.append(rec)
        args.out.write_text(json.dumps(records, indent=1))
        print(json.dumps({k: v for k, v in rec.items() if k != "history"}), flush=True)

    phases = args.phases.split(",")
    work = Path(tempfile.mkdtemp(prefix="gpu-ray-"))
    if "plain_compile" in phases:
        keep(phase_plain(data, args.compile_steps, compile=True))
    if "plain" in phases:
        keep(phase_plain(data, args.steps))
    if not any(p not in ("plain", "plain_compile") for p in phases):
        return
    import ray
    import torch

    most = max([_ray_workers(p) or 0 for p in phases] + [2])
    ray.init(num_gpus=torch.cuda.device_count(), num_cpus=most if SMOKE else None, include_dashboard=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                                  "NVSHMEM_DISABLE_NVLS") if k in os.environ}})
    def attempt(name: str, fn) -> None:  # one failing phase must not cost the others' numbers
        try:
            keep(fn())
        except Exception as err:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            keep({"phase": name, "error": f"{type(err).__name__}: {err}"[:2000]})

    for p in sorted((p for p in phases if _ray_workers(p)), key=_ray_workers):
        attempt(p, lambda p=p: _ray_run(data, p, _ray_workers(p), args.steps, work / p))
    if "ref" in phases:
        attempt("ref", lambda: _ray_run(data, "ref", 2, args.short, work / "ref", ckpt=2))
    if "ref" in phases:  # a second uninterrupted run: GPU run-to-run noise, the yardstick for resume/fault
        attempt("ref_repeat", lambda: _ray_run(data, "ref_repeat", 2, args.short, work / "ref_repeat", ckpt=2))
    if "resume" in phases:
        # interrupted (max_failures 0: rank 0 raises after step 4, after its checkpoint), then run again: the
        # same inputs and settings (same lr schedule) resume from the checkpoint
        def interrupted() -> dict:
            try:
                _ray_run(data, "resume_first", 2, args.short, work / "resume", ckpt=2, max_failures=0,
                         fault={"at_step": 4, "rank": 0, "marker": str(work / "resume-fired")})
            except Exception as err:  # noqa: BLE001 - the expected failure
                return {"phase": "resume_first", "failed_as_planned": "injected fault" in str(err),
                        "error_head": str(err)[:300]}
            return {"phase": "resume_first", "failed_as_planned": False}

        attempt("resume_first", interrupted)
        attempt("resume", lambda: _ray_run(data, "resume", 2, args.short, work / "resume", ckpt=2))
    if "fault" in phases:
        marker = work / "fault-fired"

        def fault() -> dict:
            rec = _ray_run(data, "fault", 2, args.short, work / "fault", ckpt=2,
                           fault={"at_step": 3, "rank": 1, "marker": str(marker), "kill": True})
            rec["fault_fired"] = marker.read_text() if marker.is_file() else None
            return rec

        attempt("fault", fault)
    by = {r["phase"]: r for r in records if "error" not in r}
    summary = {"phase": "summary"}
    if "plain" in by and "ray1" in by:
        summary["ray1_vs_plain"] = by["ray1"]["tokens_per_s"] / by["plain"]["tokens_per_s"]
    for p in (p for p in by if _ray_workers(p) and _ray_workers(p) > 1 and "ray1" in by):
        n = _ray_workers(p)
        summary[f"scaling_1_to_{n}"] = by[p]["tokens_per_s"] / (n * by["ray1"]["tokens_per_s"])
        summary[f"loss_curve_vs_ray1_{n}"] = _loss_curves(by["ray1"]["history"], by[p]["history"])
    for p in ("ref_repeat", "resume", "fault"):
        if p in by and "ref" in by:
            summary[f"{p}_same_checksum_as_ref"] = by[p]["adapter_checksums"][0] == by["ref"]["adapter_checksums"][0]
            summary[f"{p}_diff_vs_ref"] = _adapter_diff(by[p]["adapter_dir"], by["ref"]["adapter_dir"])
            summary[f"{p}_start_step"] = by[p]["start_step"]
    summary["torch"] = torch.__version__
    summary["ray"] = ray.__version__
    summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    keep(summary)
    ray.shutdown()


if __name__ == "__main__":
    main()
