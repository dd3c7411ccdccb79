"""A 4-cell sweep on tiny random-weight models, one cell at a time vs all four at once on one local Ray.

Each variant starts from an empty output folder and a fresh MLflow store (a local server per sweep), runs
`tomtransfer sweep` as a subprocess (inside the caller's network namespace: `make bench` / `scripts/in-netns`) and
records the wall time, the per-cell times the sweep printed and the summary rows. Raw JSON:
benchmarks/results/sweep_tiny.json.

    scripts/in-netns .venv/bin/python -m benchmarks.bench_sweep
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sweep_tiny.json"


def base_config(out: Path) -> dict:
    from tests.fixtures.tiny_models import tiny_model_dir

    return {
        "name": "bench-sweep",
        "output_dir": str(out),
        "models": {"teacher": {"model": str(tiny_model_dir("llama", seed=7)), "num_cpus": 0.25},
                   "student": {"model": str(tiny_model_dir("llama", seed=8)), "num_cpus": 0.25}},
        "sampling": {"temperature": 1.0, "max_tokens": 8, "seed": 1},
        "scenarios": {"ids": ["IR_prison", "team_delight", "IR_prison_x2", "sports_prison", "pgg"]},
        "serving": {"port": 8131},
        "generate": {"samples": 8, "request_n": 8, "valid_policy": "all"},
        "training": {"epochs": 1, "learning_rate": 1e-3, "effective_batch_size": 4, "per_device_batch_size": 2,
                     "num_workers": 1, "cpus_per_worker": 0.25, "max_seq_len": 1024, "adapter_name": "cell"},
        "evaluate": {"estimator": "exact", "samples": 100},
        "mlflow": {"experiment": "bench-sweep"},
    }


def one(max_concurrent: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tt-bench-sweep-") as tmp:
        tmp = Path(tmp)
        (tmp / "base.yaml").write_text(yaml.safe_dump(base_config(tmp / "runs")))
        (tmp / "sweep.yaml").write_text(yaml.safe_dump({
            "name": "tiny4", "base": "base.yaml", "max_concurrent": max_concurrent,
            "grid": {"sampling.seed": [1, 2], "training.learning_rate": [1e-3, 2e-3]}}))
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "tomtransfer.services.cli", "sweep", "--config", str(tmp / "sweep.yaml")],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "400"})
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"sweep (max_concurrent {max_concurrent}) failed:\n{p.stderr[-3000:]}")
        cells = [float(s) for s in re.findall(r"done in (\d+) s", p.stderr)]
        return {"max_concurrent": max_concurrent, "wall_s": round(wall, 1), "cell_s": cells,
                "stdout_tail": p.stdout[-2000:]}


def main() -> None:
    runs = [one(1), one(4)]
    seq, par = runs
    result = {
        "benchmark": "4-cell tiny-model sweep (2 seeds x 2 learning rates): sequential vs concurrent on one local Ray",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "runs": runs,
        "speedup": round(seq["wall_s"] / par["wall_s"], 2),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"} |
                     {"wall_s": {r["max_concurrent"]: r["wall_s"] for r in runs}}, indent=2))


if __name__ == "__main__":
    main()
