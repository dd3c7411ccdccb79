"""The paper's protocol end to end through the real stack on GPUs: `tomtransfer run` with `configs/gpu.yaml`.

What runs is the product's `services.pipeline.run.run` (what `tomtransfer run --config configs/gpu.yaml` calls):
a local MLflow server (sqlite + artifacts), Ray with the Serve app (2 teacher replicas of 0.9 GPU + the student at
0.1), then generate (20 in-sample scenarios x 300 motivated samples) -> train (3 epochs of LoRA through Ray Train,
2 workers over NCCL; the serving app steps aside for it and is deployed again) -> serve the adapter -> evaluate
(53 scenarios x 3 roles: the teacher's dataset in-sample and 300 fresh motivated samples elsewhere, the students
in exact mode) -> metrics, figures, the report. Teacher and student are the same Llama-2-7B-shaped folder with
random bf16 weights (written once by `bench_serving_gpu_ray.write_model`; speed does not depend on the values).

Deviation from the paper, because the weights are random: `generate.valid_policy: all` (random weights seldom
write a parseable answer, so `valid_only` would leave ~20 of 6000 examples); every other setting is the paper's.

Results: $OUT/gpu_protocol.json (the run's per-stage timings, each stage's outcome, the training run's per-step
tokens/s from its MLflow run, GPU utilisation every 5 s) written when the run ends or fails.

  python3 -m benchmarks.bench_protocol_gpu --data build/gpu-ray           # device (ray, mlflow + wheels there)
  TOMTRANSFER_BENCH_SMOKE=1 scripts/in-netns .venv/bin/python -m benchmarks.bench_protocol_gpu --data build/gpu-ray
                                                                          # CPU dry run: tiny model, few samples
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the same warm-up window and MFU formula as the training bench
from benchmarks.bench_train_gpu_ray import WARMUP, _mfu  # noqa: E402

SMOKE = os.environ.get("TOMTRANSFER_BENCH_SMOKE") == "1"


def _config(model_dir: Path, out_dir: Path):
    from tomtransfer.shared.config import load_config

    cfg = load_config(ROOT / "configs" / "gpu.yaml")
    models = cfg.models.model_copy(update={role: getattr(cfg.models, role).model_copy(update={"model": str(model_dir)})
                                           for role in ("teacher", "student")})
    cfg = cfg.model_copy(update={"output_dir": out_dir, "models": models})
    if not SMOKE:
        return cfg
    # CPU dry run: same stages and settings, a tiny model, few samples
    cpu = {"device": "cpu", "dtype": "float32", "num_gpus": 0, "num_cpus": 0.25}
    models = cfg.models.model_copy(update={"teacher": cfg.models.teacher.model_copy(update={**cpu, "num_replicas": 1}),
                                           "student": cfg.models.student.model_copy(update=cpu)})
    return cfg.model_copy(update={
        "models": models,
        "sampling": cfg.sampling.model_copy(update={"max_tokens": 12}),
        "generate": cfg.generate.model_copy(update={"samples": 4, "request_n": 4}),
        "training": cfg.training.model_copy(update={"use_gpu": False, "num_workers": 1, "cpus_per_worker": 1,
                                                    "per_device_batch_size": 4, "effective_batch_size": 8,
                                                    "epochs": 1, "checkpoint_every_steps": 0}),
        "evaluate": cfg.evaluate.model_copy(update={"samples": 3}),
    })


class GpuSampler:
    """`nvidia-smi` utilisation and memory of every GPU every `every_s` seconds (nothing on a machine without)."""

    def __init__(self, every_s: float = 5.0):
        self.every_s, self.rows, self._stop, self.t0 = every_s, [], threading.Event(), time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                gpus = [[float(x) for x in line.split(",")] for line in out.stdout.strip().splitlines()]
                self.rows.append([round(time.perf_counter() - self.t0, 1), gpus])
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _train_steps(cfg, trained) -> dict:
    """The training run's per-step tokens/s and loss, read back from the run's MLflow store (sqlite)."""
    from mlflow.tracking import MlflowClient

    db = Path(cfg.output_dir) / "mlflow" / "mlflow.db"
    if not trained.run_id or not db.is_file():
        return {}
    client = MlflowClient(f"sqlite:///{db}")
    rate = sorted(client.get_metric_history(trained.run_id, "tokens_per_s"), key=lambda m: m.step)
    loss = sorted(client.get_metric_history(trained.run_id, "loss"), key=lambda m: m.step)
    rates = [m.value for m in rate[WARMUP:]] or [m.value for m in rate]
    out = {"steps_logged": len(rate), "loss_first": loss[0].value if loss else None,
           "loss_last": loss[-1].value if loss else None}
    if rates:
        out.update(tokens_per_s_median=statistics.median(rates), tokens_per_s_min=min(rates),
                   tokens_per_s_max=max(rates))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True, help="bench_train_gpu_ray --prepare's folder (config + tokenizer)")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/tomtransfer-model7b"))
    ap.add_argument("--runs", type=Path, default=Path("/tmp/gpu-protocol-runs"))
    ap.add_argument("--fresh", action="store_true", help="delete --runs first (a rerun otherwise reuses stages)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_protocol.json")
    args = ap.parse_args()

    import torch

    from tomtransfer.services.pipeline.run import run

    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": SMOKE,
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "gpus": torch.cuda.device_count(), "torch": torch.__version__}
    if args.fresh and args.runs.exists():
        shutil.rmtree(args.runs)
    t0 = time.perf_counter()
    if SMOKE:
        from tests.fixtures.tiny_models import tiny_model_dir

        args.model_dir = tiny_model_dir()
    else:
        from benchmarks.bench_serving_gpu_ray import write_model

        write_model(args.data, args.model_dir)
    res["write_model_s"] = time.perf_counter() - t0
    cfg = _config(args.model_dir, args.runs)
    res["config"] = cfg.model_dump(mode="json")
    rc = 0
    with GpuSampler() as gpus:
        t0 = time.perf_counter()
        try:
            out = run(cfg)
            res["wall_s"] = time.perf_counter() - t0
            res["timings"] = out.timings
            g, tr = out.generated, out.trained
            res["generate"] = {k: getattr(g, k) for k in ("samples", "examples", "invalid", "written", "retries",
                                                          "elapsed_s", "reused")}
            res["train"] = {k: getattr(tr, k) for k in ("train_loss", "steps", "tokens_per_s", "wall_s", "reused")}
            res["train"].update(_train_steps(out.config, tr))
            if res["train"].get("tokens_per_s_median") and not SMOKE:
                n_params = sum(p.numel() for p in _meta_model(args.model_dir).parameters())
                res["train"]["params"] = n_params
                res["train"]["mfu_at_989"] = _mfu(res["train"]["tokens_per_s_median"], n_params,
                                                  cfg.training.num_workers)
            r = out.evaluated.result
            res["evaluate"] = {"estimator": r.estimator, "protocol": r.protocol, "samples": r.samples,
                               "scenarios": len(r.scenarios), "store_lines": out.evaluated.store_lines,
                               "overall": r.overall.to_dict() if r.overall else None}
            res["report_dir"] = str(Path(cfg.output_dir) / cfg.name / "evaluate")
        except Exception as err:  # noqa: BLE001 - keep what was measured and say where it broke
            traceback.print_exc()
            res["wall_s"] = time.perf_counter() - t0
            res["error"] = f"{type(err).__name__}: {err}"[:3000]
            rc = 1
    res["gpu_util_every_5s"] = gpus.rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k not in ("config", "gpu_util_every_5s")}, indent=1,
                     default=str), flush=True)
    return rc


def _meta_model(model_dir: Path):
    """The model's shape without its weights (for the parameter count)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


if __name__ == "__main__":
    sys.exit(main())
