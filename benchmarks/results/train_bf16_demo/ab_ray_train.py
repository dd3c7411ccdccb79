import json, sys, tempfile, time
import pandas as pd
sys.path.insert(0, "/work/main")
import ray
from tomtransfer.services.trainer.train import resolve_student, run_training
from tomtransfer.shared.config import parse_config
src = "/tmp/fresh/tomtransfer/runs/demo/generate/28777fa319e3/dataset/train.parquet"
ds = tempfile.mkdtemp() + "/train.parquet"
pd.read_parquet(src).head(16).to_parquet(ds)
student = resolve_student("smollm2-135m-instruct")
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
for arm in sys.argv[1:]:
    dtype, ckpt = arm.split(":")
    cfg = parse_config({"name": f"ab-{dtype}", "output_dir": tempfile.mkdtemp(),
                        "models": {"teacher": {"model": "t"}, "student": {"model": str(student)}},
                        "training": {"epochs": 1, "per_device_batch_size": 2, "effective_batch_size": 8, "max_seq_len": 512,
                                     "num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": 2,
                                     "gradient_checkpointing": ckpt == "1", "dtype": dtype}})
    t = time.time()
    r = run_training(cfg, ds, student, None)
    m = r if isinstance(r, dict) else getattr(r, "metrics", {}) or {}
    import resource; print(json.dumps({"dtype": dtype, "ckpt": ckpt, "wall": round(time.time() - t, 1),
                      **{k: v for k, v in (m.items() if isinstance(m, dict) else []) if "token" in k or k.endswith("_s")}}), flush=True)
