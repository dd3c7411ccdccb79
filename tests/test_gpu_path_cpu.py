"""What the GPU path through Ray needed, checked on CPU (benchmarks/bench_train_gpu_ray.py runs it on H200s).

- `fault: {"kill": true}` makes the worker process die by SIGKILL (a lost node: no exception, no cleanup),
  after its last checkpoint is on disk; a run resumed from that checkpoint ends with the same adapter as a run
  that was never interrupted. (The Ray Train version, FailureConfig restarting the killed worker group, is
  `tests/test_trainer_ray.py`'s exception fault on CPU and the `fault` phase of the GPU benchmark.)
- Ray Train V2 drains a worker's one-slot result queue once per controller poll (2 s), so a metrics report per
  step capped the 2-GPU loop at one step per 2 s. Intermediate metrics now go to Ray at most every
  `report_every_s` seconds (rank 0's clock, agreed by all ranks through the loss all-reduce, since a report is a
  barrier); checkpoints and the end always report. Checked with 2 Ray Train workers on CPU (gloo): the count
  follows the setting, and the adapter does not depend on it.
- A checkpoint reported to Ray Train is recorded only at the controller's next poll; the loop now waits for it,
  so a worker SIGKILLed one (fast) step after a checkpoint restarts from it, not from scratch.
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


@pytest.fixture(scope="module")
def ray_cluster():
    from tests.fixtures.netns_guard import require_private_netns

    require_private_netns()
    import tempfile

    import ray

    tmp = tempfile.mkdtemp(prefix="/tmp/rt")  # short: Ray's socket paths must stay under 107 characters
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.netns
@pytest.mark.slow
def test_ray_metric_reports_are_rate_limited_and_do_not_change_training(ray_cluster, data, llama, tmp_path):
    from tomtransfer.services.trainer.train import run_training
    from tomtransfer.shared.config import parse_config

    def run(out, report_every_s):
        cfg = parse_config({
            "name": "gate", "output_dir": str(tmp_path / out),
            "models": {"teacher": {"model": "fake-teacher"}, "student": {"model": str(llama)}},
            "training": {"num_workers": 2, "cpus_per_worker": 1, "epochs": 3, "effective_batch_size": 4,
                         "per_device_batch_size": 1, "learning_rate": 3e-2, "max_failures": 0}})
        return run_training(cfg, data, llama, None, extra_loop_config={"report_every_s": report_every_s})

    every = run("every", 0)  # 16 examples / (1 x 2 workers x accum 2): 4 steps an epoch, 12 in all
    gated = run("gated", 3600)
    assert every["step"] == gated["step"] == 12
    assert every["ray_metric_reports"] == 12 - 3  # all but the 2 epoch-end checkpoints and the final report
    assert gated["ray_metric_reports"] == 0
    assert every["adapters_identical"] and gated["adapters_identical"]
    assert every["adapter_checksums"] == gated["adapter_checksums"]


@pytest.mark.netns
@pytest.mark.slow
def test_a_worker_killed_right_after_a_checkpoint_resumes_from_it(ray_cluster, data, llama, tmp_path):
    """Ray Train records a checkpoint when its controller polls the workers' result queues (every 2 s); the loop
    waits for that before it trains on, so a worker killed one fast step later still restarts from it."""
    from tomtransfer.services.trainer.train import run_training
    from tomtransfer.shared.config import parse_config

    def run(out, **extra):
        cfg = parse_config({
            "name": "kill", "output_dir": str(tmp_path / out),
            "models": {"teacher": {"model": "fake-teacher"}, "student": {"model": str(llama)}},
            "training": {"num_workers": 2, "cpus_per_worker": 1, "epochs": 1, "effective_batch_size": 4,
                         "per_device_batch_size": 1, "learning_rate": 3e-2, "max_failures": 1}})
        return run_training(cfg, data, llama, None, checkpoint_every_steps=2, extra_loop_config=extra)

    whole = run("whole")
    marker = tmp_path / "fired"
    killed = run("killed", fault={"at_step": 3, "rank": 1, "marker": str(marker), "kill": True})
    assert marker.read_text().startswith("fault injected at step 3 on rank 1")
    assert killed["start_step"] == 2 and killed["step"] == whole["step"] == 4  # restarted at the checkpoint
    assert killed["adapter_checksums"] == whole["adapter_checksums"]


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
