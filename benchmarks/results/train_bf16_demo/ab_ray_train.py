"""The bf16 A/B through Ray Train: scripts/in-netns .venv/bin/python benchmarks/results/train_bf16_demo/ab_ray_train.py
DATASET.parquet float32:1 bfloat16:1 bfloat16:0 (DATASET: a demo run's runs/demo/generate/*/dataset/train.parquet;
each arm is DTYPE:GRADIENT_CHECKPOINTING). One JSON line per arm."""
import json, sys, tempfile, time
import pandas as pd
import ray
from tomtransfer.services.trainer.train import resolve_student, run_training
from tomtransfer.shared.config import parse_config
src = sys.argv[1]  # was /tmp/fresh/tomtransfer/runs/demo/generate/28777fa319e3/dataset/train.parquet
ds = tempfile.mkdtemp() + "/train.parquet"
pd.read_parquet(src).head(16).to_parquet(ds)
student = resolve_student("smollm2-135m-instruct")
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
for arm in sys.argv[2:]:
    dtype, ckpt = arm.split(":")
    cfg = parse_config({"name": f"ab-{dtype}", "output_dir": tempfile.mkdtemp(),
                        "models": {"teacher": {"model": "t"}, "student": {"model": str(student)}},
                        "training": {"epochs": 1, "per_device_batch_size": 2, "effective_batch_size": 8, "max_seq_len": 512,
                                     "num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": 2,
                                     "gradient_checkpointing": ckpt == "1", "dtype": dtype}})
    t = time.time()
    r = run_training(cfg, ds, student, None)
    m = r if isinstance(r, dict) else getattr(r, "metrics", {}) or {}
    print(json.dumps({"dtype": dtype, "ckpt": ckpt, "wall": round(time.time() - t, 1),
            **{k: v for k, v in (m.items() if isinstance(m, dict) else []) if "token" in k or k.endswith("_s")}}), flush=True)
