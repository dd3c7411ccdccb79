"""What the GPU path through Ray needed, checked on CPU (benchmarks/bench_train_gpu_ray.py runs it on H200s).

- `fault: {"kill": true}` makes the worker process die by SIGKILL (a lost node: no exception, no cleanup),
  after its last checkpoint is on disk; a run resumed from that checkpoint ends with the same adapter as a run
  that was never interrupted. (The Ray Train version, FailureConfig restarting the killed worker group, is
  `tests/test_trainer_ray.py`'s exception fault on CPU and the `fault` phase of the GPU benchmark.)
- Ray Train V2 drains a worker's one-slot result queue once per controller poll (2 s), so a metrics report per
  step capped the 2-GPU loop at one step per 2 s: intermediate metrics go to Ray at most every `report_every_s`;
  and a checkpoint reported to Ray Train is recorded only at the controller's next poll, so the loop waits for it.
  Both are checked with 2 Ray Train workers on CPU in tests/test_trainer_ray.py, against its uninterrupted run.
- `configs/gpu.yaml`, the profile that ran on the GPUs, loads and asks for what the GPU path needs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["IR_prison", "biz_staghunt"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tomtransfer.services.trainer.dataset import export_training_set
    from tests.fixtures.synthetic_samples import fake_samples

    samples = fake_samples(SCENARIOS, n=8, c_rate=0.9, invalid_rate=0.0, seed=5)
    return export_training_set(samples, tmp_path_factory.mktemp("ds"), targets="answer").parquet


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.fixtures.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=1)


def _config(data, student, out, **over) -> dict:
    return {"dataset_path": str(data), "student_path": str(student), "num_threads": 1, "output_dir": str(out),
            "probe_examples": 0, "training": {"epochs": 2, "effective_batch_size": 4, "per_device_batch_size": 2,
                                              "learning_rate": 3e-2}, **over}


def test_kill_fault_dies_by_sigkill_and_the_resumed_run_matches(data, llama, tmp_path):
    from tomtransfer.services.trainer.train import train_loop_per_worker

    full = train_loop_per_worker(_config(data, llama, tmp_path / "full"))
    cut = _config(data, llama, tmp_path / "cut", checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_steps=1,
                  fault={"at_step": 3, "rank": 0, "marker": str(tmp_path / "fired"), "kill": True})
    code = ("import json, sys; from tomtransfer.services.trainer.train import train_loop_per_worker; "
            "train_loop_per_worker(json.loads(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cut)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "injected fault" not in proc.stderr  # killed, not raised
    assert (tmp_path / "fired").read_text().startswith("fault injected at step 3")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    assert not (tmp_path / "cut" / "adapter").exists()  # died before the end

    resumed = train_loop_per_worker(_config(data, llama, tmp_path / "cut", resume_from=str(tmp_path / "ckpt")))
    assert resumed["start_step"] == 3 and resumed["step"] == full["step"] > 3
    assert resumed["adapter_checksums"] == full["adapter_checksums"]


def test_gpu_profile_loads_and_asks_for_gpus():
    from tomtransfer.shared.config import load_config

    cfg = load_config(ROOT / "configs" / "gpu.yaml")
    t = cfg.training
    assert t.use_gpu and t.num_workers == 2 and t.max_failures >= 1
    assert (t.lora.r, t.lora.alpha, t.lora.target_modules) == (8, 16, ["q_proj", "v_proj"])  # the paper's LoRA
    assert t.effective_batch_size == 64 and t.learning_rate == 5e-5 and t.epochs == 3
    for spec in (cfg.models.teacher, cfg.models.student):
        assert spec.device == "cuda" and spec.dtype == "bfloat16"
    # what Ray can place on 2 GPUs: a teacher replica per GPU and the student beside one of them
    gpus = cfg.models.teacher.num_gpus * cfg.models.teacher.num_replicas + cfg.models.student.num_gpus
    assert cfg.models.teacher.num_gpus + cfg.models.student.num_gpus <= 1 and 1 < gpus <= 2
    assert cfg.generate.samples == 300 and cfg.evaluate.samples == 300


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_the_effective_batch_is_held_at_64_for_any_number_of_gpus(workers, tmp_path):
    """The scaling benchmark's rule (bench_train_gpu_ray._config: fewer accumulation steps, then smaller micro-batches)
    keeps the paper's 64 on 1-8 workers; the config refuses a micro-batch that would make it grow."""
    import math

    from benchmarks.bench_train_gpu_ray import _config
    from tomtransfer.shared.config import ConfigError, parse_config

    t = _config(ROOT / "build" / "no-data", tmp_path, workers).training
    accum = max(1, math.ceil(t.effective_batch_size / (t.per_device_batch_size * workers)))
    assert t.num_workers == workers and t.per_device_batch_size * accum * workers == 64
    base = {"name": "b", "models": {"teacher": {"model": "t"}, "student": {"model": "s"}}}
    with pytest.raises(ConfigError, match=f"set per_device_batch_size to {64 // workers} or fewer"):
        parse_config({**base, "training": {"num_workers": workers, "per_device_batch_size": 64 // workers + 1}})
    if workers > 1:  # more workers than examples in an effective batch
        with pytest.raises(ConfigError, match=f"use at most {workers - 1} workers"):
            parse_config({**base, "training": {"num_workers": workers, "per_device_batch_size": 1,
                                               "effective_batch_size": workers - 1}})
