"""LoRA fine-tuning of the student on the teacher's training set: one recipe, one file.

Read it top to bottom: `train_loop_per_worker` is the per-worker recipe, the ordered list of its steps (numbered
in the order they run, one function each right below it: `_setup_worker`, `_setup_data`, ..., `_train`, `_save`);
`run_training` launches it on Ray Train.

Features
- Tokenization with the student's own chat template (`apply_chat_template`): prompt = the scenario's
  system + user turns with the generation prompt, target = the assistant turn as the template renders it
  (end-of-turn token included). Loss on assistant tokens only (prompt tokens are labelled -100).
  Templates that reject a system turn get it merged into the user turn.
- Objectives (`training.objective`): `sft` (the above, the paper's), `distribution` (forward KL from the teacher's
  per-scenario choice distribution, the soft-label set, to the student's softmax over the action strings'
  log-likelihoods: `services.trainer.distill`; the loop's unit is then a scenario), `sft+distribution`
  ((1 - w) x sft + w x distribution; each optimizer step also takes the next soft labels of a seeded endless
  shuffle, a function of the step, so resume stays exact). Loss metrics `loss_sft` / `loss_distribution` beside
  `loss`.
- peft LoRA with the paper's defaults from `TrainingConfig.lora` (r=8, alpha=16, dropout 0, q_proj/v_proj),
  AdamW (fused on GPU), lr 5e-5 with a cosine (or linear/constant) schedule and optional warmup,
  gradient clipping, fractional epochs.
- Effective batch = per_device_batch_size x grad_accum x workers; grad_accum = ceil(effective /
  (per_device x workers)). The loss is the exact token mean over the whole effective batch (token counts are
  all-reduced before the backward passes), not a mean of micro-batch means.
- bf16 on GPU: frozen base weights in bf16, LoRA weights and optimizer state in fp32, forward under
  bf16 autocast. fp32 on CPU, or the GPU's recipe with `training.dtype: bfloat16` (about 2x faster steps on a
  CPU with AMX). SDPA attention. Optional `torch.compile` and gradient checkpointing.
- Ray Train DDP (`ray.train.torch.prepare_model`; gloo on CPU, NCCL on GPU) with a `DistributedSampler`
  (seeded, per-epoch shuffle); without Ray it runs as one plain torch process (world size 1) - the GPU
  benchmark runs it that way. Neither ray nor mlflow is imported at module import time.
- Checkpoints (adapter weights, optimizer, scheduler, position, RNG) every `checkpoint_every_steps`
  optimizer steps and at each epoch end, through `ray.train.report(metrics, checkpoint=...)`. A restarted
  worker group (FailureConfig) or a re-run with the same name resumes from the latest checkpoint, at the
  exact micro-batch where it stopped. Training goes on only once Ray has recorded the checkpoint (at most one
  controller poll, 2 s). Intermediate metrics go to Ray at most every `report_every_s` (10 s): a report per
  step would hold every step to one poll. Without Ray: `checkpoint_dir` / `resume_from` folders.
- Rank 0 logs params, loss, learning rate, grad norm and tokens/s to MLflow (the run id comes in the
  config), and at the end the adapter in PEFT format under the run's artifact path `adapter/`
  (`runs:/<run_id>/adapter`, loadable with `PeftModel.from_pretrained` once downloaded) with the training
  config beside it (`adapter/tomtransfer_training.json`), and an MLflow LoggedModel named after
  `adapter_name` holding the same files (`models:/<model_id>`). The run gets tags `tomtransfer.adapter_uri`
  and `tomtransfer.adapter_model_id`.
- At the end every rank hashes its adapter weights; rank 0 gathers the hashes (all-gather) and reports them
  (`adapter_checksums`), so replica drift is visible. Rank 0 also saves logits of a few training examples
  (`probe.pt`) so a reload can be checked against the trained model.
- Fault injection for tests: `fault = {"at_step": k, "rank": r, "marker": path}` makes rank r raise once
  after step k (the marker file records that it already did); with `"kill": true` the worker process SIGKILLs
  itself instead (a lost node: no exception reaches Ray, the worker just dies).

Limits
- Data parallel only: every worker holds the whole base model (no FSDP/ZeRO): fine up to ~8B in bf16 on
  an 80 GB GPU. No sequence packing (batches are padded to their longest sequence).
- Single-turn prompts ([system,] user -> assistant), which is what the generate stage writes.
- Without Ray only world size 1 is supported (no torchrun).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tomtransfer.services.common import lean_transformers

IGNORE_INDEX = -100
ADAPTER_ARTIFACT_PATH = "adapter"
TRAINING_CONFIG_FILE = "tomtransfer_training.json"
PROBE_FILE = "probe.pt"
STATE_FILE = "trainer_state.pt"

try:  # shared/ needs pydantic, which the device image lacks; the loop must import without it
    from tomtransfer.shared.errors import UserError as _UserError
except ImportError:  # pragma: no cover
    _UserError = ValueError
try:
    from tomtransfer.shared.config import TrainingConfig
except ImportError:  # pragma: no cover
    TrainingConfig = None

# The training knobs the loop reads, and their defaults where a caller leaves one out: TrainingConfig's (the paper's).
# Without pydantic there are none: the caller passes every knob, `lora` included (benchmarks/bench_train_gpu.py on
# the device image).
LOOP_KNOBS = ("lora", "learning_rate", "lr_scheduler", "warmup_ratio", "epochs", "effective_batch_size",
              "per_device_batch_size", "max_seq_len", "max_grad_norm", "adapter_name", "objective",
              "distribution_weight", "dtype")
DEFAULT_TRAINING: dict[str, Any] = {"lora": {}}
if TrainingConfig is not None:
    DEFAULT_TRAINING = {k: v for k, v in TrainingConfig().model_dump(mode="json").items() if k in LOOP_KNOBS}


class TrainError(_UserError):
    """Input the loop cannot train on (no chat template, empty set after truncation, bad config)."""


# ------------------------------------------------------------------------------------ tokenization
def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2 TemplateError: e.g. Gemma-style templates that refuse a system turn
        if messages and messages[0]["role"] == "system" and "system" in str(err).lower():
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return tokenizer.apply_chat_template(
                merged + messages[2:], tokenize=False, add_generation_prompt=add_generation_prompt
            )
        raise


def encode_example(tokenizer, messages: list[dict], target: str, max_len: int) -> dict | None:
    """input_ids + labels for one example, the prompt masked; None if the prompt alone fills `max_len`.

    The template renders the prompt (with the generation prompt) and the full chat; the full text must start
    with the prompt text (true of every chat template we know). Prompt and completion are tokenized
    separately, as LLaMA-Factory does, so the boundary is exact."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError("the student's tokenizer has no chat template; use an instruct/chat model")
    prompt = _render(tokenizer, messages, add_generation_prompt=True)
    full = _render(tokenizer, messages + [{"role": "assistant", "content": target}], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise TrainError("the chat template does not render the prompt as a prefix of the full chat")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in answer_ids:
        answer_ids = answer_ids + [eos]  # a template that ends no turn: the student must still learn to stop
    if len(prompt_ids) >= max_len:
        return None
    answer_ids = answer_ids[: max_len - len(prompt_ids)]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def _encode_soft_labels(tokenizer, path, max_len: int) -> tuple[list[dict], int]:
    """The soft-label set at `path` encoded for the distribution objective (`services.trainer.distill`), and how
    many rows did not fit `max_len`. Raises TrainError for a missing/empty set or an action the student's tokenizer
    cannot score."""
    from tomtransfer.services.trainer.distill import ObjectiveError, encode_soft_label
    from tomtransfer.services.trainer.softlabels import read_soft_labels

    if not path:
        raise TrainError("training.objective needs a soft-label set (soft_labels_path), none was given")
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError("the student's tokenizer has no chat template; use an instruct/chat model")
    rows, skipped = [], 0
    for row in read_soft_labels(path):
        try:
            enc = encode_soft_label(tokenizer, row, max_len, _render)
        except ObjectiveError as err:
            raise TrainError(f"{row['scenario_id']}: {err}") from None
        if enc is None:
            skipped += 1
        else:
            rows.append(enc)
    if not rows:
        raise TrainError(f"every soft-label prompt is longer than max_seq_len={max_len}")
    return rows, skipped


def _distill_kl_sum(model, rows, pad_id, device, autocast):
    from tomtransfer.services.trainer.distill import kl_sum

    return kl_sum(model, rows, pad_id, device, autocast)


def collate(batch: list[dict], pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence (rounded up to `pad_to_multiple`)."""
    longest = max(len(ex["input_ids"]) for ex in batch)
    longest = -(-longest // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------- distributed
class _Dist:
    """Rank, world and collectives: Ray Train workers (torch.distributed set up by Ray) or one process."""

    def __init__(self, use_ray: bool, use_gpu: bool):
        self.use_ray = use_ray
        if use_ray:
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            self.rank, self.world, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
            self.device = ray.train.torch.get_device()
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0
            self.device = torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")
            if use_gpu and self.device.type != "cuda":
                raise TrainError("use_gpu is set but no CUDA device is visible")
        self.distributed = self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


# ----------------------------------------------------------------------------------------- MLflow
class _MlflowLog:
    """Rank 0's MLflow client (None-safe: does nothing without a tracking URI and run id)."""

    def __init__(self, cfg: dict | None, rank: int):
        self.client = None
        self.run_id = None
        if rank != 0 or not cfg or not cfg.get("tracking_uri") or not cfg.get("run_id"):
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(cfg["tracking_uri"])
        self.client = MlflowClient(cfg["tracking_uri"])
        self.run_id = cfg["run_id"]

    def params(self, params: dict) -> None:
        if not self.client:
            return
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def metrics(self, metrics: dict, step: int) -> None:
        """Best effort: a tracking-server outage (after the client's own retries) must not kill training."""
        if not self.client:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        try:
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
            )
        except Exception as err:  # noqa: BLE001
            print(f"[train] warning: MLflow metrics at step {step} not logged: {err}", flush=True)

    def final(self, adapter_dir: Path, probe: Path | None, adapter_name: str, params: dict) -> dict:
        if not self.client:
            return {}
        self.client.log_artifacts(self.run_id, str(adapter_dir), ADAPTER_ARTIFACT_PATH)
        if probe is not None:
            self.client.log_artifact(self.run_id, str(probe), "probe")
        run = self.client.get_run(self.run_id)
        model = self.client.create_logged_model(
            experiment_id=run.info.experiment_id,
            name=adapter_name,
            source_run_id=self.run_id,
            params={k: str(v) for k, v in params.items()},
            tags={"tomtransfer.kind": "peft-lora-adapter", "tomtransfer.adapter_uri": f"runs:/{self.run_id}/adapter"},
            model_type="peft-lora-adapter",
        )
        self.client.log_model_artifacts(model.model_id, str(adapter_dir))
        self.client.finalize_logged_model(model.model_id, "READY")
        uri = f"runs:/{self.run_id}/{ADAPTER_ARTIFACT_PATH}"
        self.client.set_tag(self.run_id, "tomtransfer.adapter_uri", uri)
        self.client.set_tag(self.run_id, "tomtransfer.adapter_model_id", model.model_id)
        self.client.set_tag(self.run_id, "tomtransfer.adapter_name", adapter_name)
        return {"adapter_uri": uri, "adapter_model_id": model.model_id, "adapter_model_uri": f"models:/{model.model_id}"}


# ---------------------------------------------------------------------------------------- helpers
def adapter_checksum(model) -> str:
    """sha256 over the trainable (LoRA) weights in name order, as fp32 bytes."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return f


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flat(prefix: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(f"{prefix}{k}.", v)
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------- the recipe
def train_loop_per_worker(config: dict) -> dict:
    """The per-worker training loop (Ray Train's `train_loop_per_worker`, or a plain call): the recipe's steps in
    the order they run, one function each below.

    config keys (plain JSON-able values):
      dataset_path         train.parquet (or its folder), from `services.trainer.dataset`
      soft_labels_path     soft_labels.parquet (or its folder), from `services.trainer.softlabels`: needed when
                           training.objective is distribution or sft+distribution
      student_path         local HF model folder (config, tokenizer, weights)
      training             dict of `TrainingConfig` fields (missing ones: the paper's defaults)
      use_ray              True inside Ray Train (set by `run_training`); False/absent: one plain process
      use_gpu              train on CUDA (bf16); default: False
      seed                 int (default 0)
      mlflow               {"tracking_uri", "run_id"} or None: rank 0 logs there
      output_dir           where rank 0 writes the final adapter (default: a temp dir, then reported)
      checkpoint_every_steps  0: only at epoch ends
      checkpoint_dir / resume_from   (plain mode) where to write checkpoints / a checkpoint folder to resume
      log_every_steps      metrics cadence (default 1)
      report_every_s       Ray Train gets intermediate metrics at most this often (default 10 s; 0: every
                           logged step); checkpoints and the end always report
      max_steps            stop after this many optimizer steps (benchmarks); default: from epochs
      random_init          build the model from its config with random weights (benchmarks)
      compile              torch.compile the model; gradient_checkpointing: recompute activations
      pad_to_multiple      pad batches to a multiple of this (default 8 on GPU, 1 on CPU)
      num_threads          torch CPU threads (default: leave as is)
      probe_examples       how many examples' logits rank 0 saves at the end (default 2; 0: none)
      fault                {"at_step", "rank", "marker"[, "kill"]}: raise once, or SIGKILL the worker (tests)
    Returns a dict of final results (also reported to Ray Train).
    """
    w = _setup_worker(config)  # 1-2. rank, world size, device, MLflow; seeds
    data = _setup_data(config, w)  # 3. tokenizer, objective, examples and soft labels
    plan = _setup_batches(config, w, data)  # 4. batch geometry and samplers
    peft_model = _setup_model(config, w)  # 5. frozen base + LoRA adapters
    state = _load_checkpoint(config, w, peft_model)  # 6. the latest checkpoint's adapter weights (resume)
    model = _place_model(config, w, peft_model)  # 7. device, DDP, torch.compile
    opt = _setup_optimizer(w, plan, peft_model)  # 8. AdamW and the schedule,
    pos = _resume(opt, state)  # ... at the checkpoint's position and RNG
    run_params = _log_setup(w, data, plan, peft_model, pos)
    loop = _train(config, w, data, plan, model, peft_model, opt, pos)  # 9. the loop
    return _save(config, w, data, plan, peft_model, opt, pos, loop, run_params)  # 10. the end


@dataclass
class _Worker:
    """Steps 1-2: the training knobs (missing ones: the paper's defaults) and where this worker stands."""

    tcfg: dict
    lcfg: dict
    use_ray: bool
    seed: int
    dist: _Dist
    log: _MlflowLog
    t_setup: float

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def on_gpu(self) -> bool:
        return self.dist.device.type == "cuda"

    @property
    def base_dtype(self) -> torch.dtype:
        """training.dtype: auto = bf16 on GPU, fp32 on CPU."""
        want = self.tcfg.get("dtype", "auto")
        return torch.bfloat16 if want == "bfloat16" or (want == "auto" and self.on_gpu) else torch.float32


def _setup_worker(config: dict) -> _Worker:
    """1. Who am I: rank, world size, device. Ray Train has already set up torch.distributed (gloo/NCCL).
    2. Seeds: identical on every rank, so the LoRA init is identical too (DDP also broadcasts rank 0's)."""
    t_setup = time.perf_counter()
    tcfg = {**DEFAULT_TRAINING, **(config.get("training") or {})}
    lcfg = {**DEFAULT_TRAINING["lora"], **(tcfg.get("lora") or {})}
    use_ray = bool(config.get("use_ray"))
    use_gpu = bool(config.get("use_gpu"))
    seed = int(config.get("seed", 0))

    dist = _Dist(use_ray, use_gpu)
    on_gpu = dist.device.type == "cuda"
    if config.get("num_threads") and not on_gpu:
        torch.set_num_threads(int(config["num_threads"]))
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = _MlflowLog(config.get("mlflow"), dist.rank)

    random.seed(seed)
    torch.manual_seed(seed)
    return _Worker(tcfg, lcfg, use_ray, seed, dist, log, t_setup)


@dataclass
class _Data:
    """Step 3: what the loop draws from. `examples` are its units: SFT examples, or with the distribution
    objective the soft labels themselves; `soft` the distribution objective's rows
    (services.trainer.distill.encode_soft_label)."""

    pad_id: int
    objective: str
    weight: float  # the distribution loss's share: 0 (sft), 1 (distribution), training.distribution_weight
    examples: list[dict]
    skipped: int
    soft: list[dict]
    soft_skipped: int


def _setup_data(config: dict, w: _Worker) -> _Data:
    """3. Tokenizer and data: the student's chat template; loss only on the assistant turn."""
    transformers = lean_transformers.load()

    from tomtransfer.services.trainer.dataset import read_training_set

    tcfg = w.tcfg
    tokenizer = transformers.AutoTokenizer.from_pretrained(config["student_path"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise TrainError("the student's tokenizer has neither a pad nor an eos token")
    objective = str(tcfg.get("objective") or "sft")
    if objective not in ("sft", "distribution", "sft+distribution"):
        raise TrainError(f"unknown training.objective {objective!r}")
    weight = float(tcfg.get("distribution_weight", 0.5)) if objective == "sft+distribution" else \
        (1.0 if objective == "distribution" else 0.0)
    if objective == "sft+distribution" and not 0.0 < weight < 1.0:
        raise TrainError(f"training.distribution_weight must be strictly between 0 and 1, got {weight}")
    soft, soft_skipped = [], 0
    if objective != "sft":
        soft, soft_skipped = _encode_soft_labels(tokenizer, config.get("soft_labels_path"), int(tcfg["max_seq_len"]))
    examples, skipped = [], 0
    if objective != "distribution":
        rows = read_training_set(config["dataset_path"])
        for row in rows:
            ex = encode_example(tokenizer, row["messages"], row["target"], int(tcfg["max_seq_len"]))
            if ex is None:
                skipped += 1
            else:
                examples.append(ex)
        if not examples:
            raise TrainError(f"every prompt is longer than max_seq_len={tcfg['max_seq_len']}")
    else:  # the loop's unit is a scenario's soft label
        examples, skipped = soft, soft_skipped
    return _Data(pad_id, objective, weight, examples, skipped, soft, soft_skipped)


@dataclass
class _Plan:
    """Step 4: the batch geometry and the samplers that order the units."""

    per_device: int
    grad_accum: int
    sampler: Any  # torch DistributedSampler over `examples`
    steps_per_epoch: int
    total_steps: int
    pad_multiple: int
    soft_sampler: Any = None  # sft+distribution: the soft labels' own sampler
    soft_per_step: int = 0


def _setup_batches(config: dict, w: _Worker, data: _Data) -> _Plan:
    """4. Batch geometry: effective batch = per_device x grad_accum x world."""
    tcfg, dist = w.tcfg, w.dist
    per_device = int(tcfg["per_device_batch_size"])
    grad_accum = max(1, math.ceil(int(tcfg["effective_batch_size"]) / (per_device * dist.world)))
    sampler = torch.utils.data.DistributedSampler(
        range(len(data.examples)), num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=w.seed,
        drop_last=False
    )
    micro_per_epoch = math.ceil(len(sampler) / per_device)
    steps_per_epoch = math.ceil(micro_per_epoch / grad_accum)
    total_steps = max(1, math.ceil(float(tcfg["epochs"]) * steps_per_epoch))
    if config.get("max_steps"):
        total_steps = min(total_steps, int(config["max_steps"]))
    pad_multiple = int(config.get("pad_to_multiple") or (8 if w.on_gpu else 1))
    plan = _Plan(per_device, grad_accum, sampler, steps_per_epoch, total_steps, pad_multiple)
    # sft+distribution: each optimizer step also takes the next `soft_per_step` soft labels of this rank, from an
    # endless sequence of seeded shuffles (a function of the step alone, so a resumed run continues it exactly).
    if data.objective == "sft+distribution":
        plan.soft_sampler = torch.utils.data.DistributedSampler(
            range(len(data.soft)), num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=w.seed + 1,
            drop_last=False)
        plan.soft_per_step = min(len(plan.soft_sampler),
                                 math.ceil(min(len(data.soft), int(tcfg["effective_batch_size"])) / dist.world))
    return plan


def _soft_batches(plan: _Plan, soft: list[dict], at_step: int) -> list[list[dict]]:
    """sft+distribution: the soft labels optimizer step `at_step` takes, in micro-batches."""
    n = len(plan.soft_sampler)
    picked = []
    for pos in range(at_step * plan.soft_per_step, (at_step + 1) * plan.soft_per_step):
        plan.soft_sampler.set_epoch(pos // n)
        picked.append(soft[list(plan.soft_sampler)[pos % n]])
    return [picked[i : i + plan.per_device] for i in range(0, len(picked), plan.per_device)]


def _setup_model(config: dict, w: _Worker):
    """5. Model: base weights frozen (training.dtype: bf16 on GPU, fp32 on CPU by default), LoRA adapters in fp32."""
    transformers = lean_transformers.load()
    from peft import LoraConfig, get_peft_model

    lcfg = w.lcfg
    if config.get("random_init"):
        mcfg = transformers.AutoConfig.from_pretrained(config["student_path"])
        with torch.device(w.device):
            base = transformers.AutoModelForCausalLM.from_config(mcfg, dtype=w.base_dtype, attn_implementation="sdpa")
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(
            config["student_path"], dtype=w.base_dtype, attn_implementation="sdpa"
        )
    base.config.use_cache = False
    if config.get("gradient_checkpointing"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    lora = LoraConfig(
        r=int(lcfg["r"]), lora_alpha=int(lcfg["alpha"]), lora_dropout=float(lcfg["dropout"]),
        target_modules=list(lcfg["target_modules"]), bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)  # adapters in fp32 (peft's autocast_adapter_dtype)


def _load_checkpoint(config: dict, w: _Worker, peft_model) -> dict | None:
    """6. Resume: the latest checkpoint (Ray: reported by an earlier attempt of this run; plain: resume_from).
    Its adapter weights go into the model now (before DDP broadcasts them); its trainer state is returned for
    `_resume` (None: a fresh start)."""
    ckpt_dir = _latest_checkpoint_dir(config, w.use_ray)
    if ckpt_dir is None:
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(Path(ckpt_dir) / "adapter" / "adapter_model.safetensors")))
    return torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)


def _place_model(config: dict, w: _Worker, peft_model):
    """7. Device placement and DDP (Ray: prepare_model wraps in DistributedDataParallel); optional compile."""
    if w.use_ray:
        import ray.train.torch

        model = ray.train.torch.prepare_model(peft_model, parallel_strategy="ddp" if w.dist.world > 1 else None)
    else:
        model = peft_model.to(w.device)
    if config.get("compile"):
        model = torch.compile(model)
    return model


@dataclass
class _Optim:
    """Step 8: the trainable (LoRA) parameters, their optimizer and its schedule."""

    params: list
    optimizer: Any
    scheduler: Any


def _setup_optimizer(w: _Worker, plan: _Plan, peft_model) -> _Optim:
    """8. Optimizer and schedule (AdamW, fused on GPU; no weight decay, as LLaMA-Factory's default)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(w.tcfg["learning_rate"]), weight_decay=0.0, fused=w.on_gpu)
    warmup = int(float(w.tcfg["warmup_ratio"]) * plan.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(w.tcfg["lr_scheduler"], warmup, plan.total_steps))
    return _Optim(params, optimizer, scheduler)


@dataclass
class _Position:
    """Where training stands: what a checkpoint saves beside the weights, the optimizer and the RNG."""

    step: int = 0
    epoch: int = 0
    micro_done: int = 0  # micro-batches of the current epoch done
    history: list = field(default_factory=list)  # per logged step: loss, tokens/s

    def as_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "micro_done": self.micro_done, "history": self.history}


def _resume(opt: _Optim, state: dict | None) -> _Position:
    """8. (cont.) The checkpoint's optimizer, schedule, position and RNG; a fresh start is step 0."""
    if state is None:
        return _Position()
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    pos = _Position(state["step"], state["epoch"], state["micro_done"], state["history"])
    _set_rng_state(state["rng"])
    return pos


def _log_setup(w: _Worker, data: _Data, plan: _Plan, peft_model, pos: _Position) -> dict:
    """The run's parameters (to MLflow, rank 0) and one line on what is about to train."""
    dist = w.dist
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in peft_model.parameters())
    run_params = {
        **_flat("training.", w.tcfg), "world_size": dist.world, "grad_accum": plan.grad_accum,
        "effective_batch": plan.per_device * plan.grad_accum * dist.world, "examples": len(data.examples),
        "examples_too_long": data.skipped, "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
        "trainable_params": n_trainable, "total_params": n_total, "device": w.device.type,
        "base_dtype": str(w.base_dtype).removeprefix("torch."), "seed": w.seed,
        "soft_labels": len(data.soft), "soft_labels_too_long": data.soft_skipped,
    }
    w.log.params(run_params)
    if dist.rank == 0:
        objective = data.objective
        print(f"[train] objective {objective}"
              + (f" (distribution weight {data.weight:g})" if objective == "sft+distribution" else "")
              + (f", {len(data.soft)} soft labels" if data.soft else "") + ", "
              f"{len(data.examples)} examples ({data.skipped} too long), world {dist.world}, grad_accum "
              f"{plan.grad_accum}, {plan.total_steps} steps, trainable {n_trainable:,} / {n_total:,}, resume at step "
              f"{pos.step}, setup {time.perf_counter() - w.t_setup:.1f}s", flush=True)
    return run_params


@dataclass
class _Loop:
    """Step 9's bookkeeping: cadences, clocks, token counts, Ray reports and the last logged metrics."""

    start_step: int
    ckpt_every: int
    log_every: int
    report_every_s: float
    fault: dict | None
    ray_reports: int = 0
    last_report_t: float = field(default_factory=time.perf_counter)
    window_tokens: float = 0
    window_t0: float = field(default_factory=time.perf_counter)
    loop_tokens: float = 0
    loop_t0: float = field(default_factory=time.perf_counter)
    loop_cpu0: float = field(default_factory=time.process_time)
    last: dict = field(default_factory=dict)
    loop_s: float = 0.0
    loop_cpu_s: float = 0.0


def _autocast(w: _Worker):
    """bf16 autocast over a bf16 base (the LoRA matmuls in fp32 weights run in bf16 too); none over fp32."""
    return torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.base_dtype == torch.bfloat16)


def _train(config: dict, w: _Worker, data: _Data, plan: _Plan, model, peft_model, opt: _Optim,
           pos: _Position) -> _Loop:
    """9. The loop: optimizer steps up to total_steps, an epoch (a fresh shuffle) at a time."""
    # Ray Train V2 drains each worker's one-slot result queue once per controller poll (2 s), so a report per
    # step caps the loop at one step per poll (measured on 2 H200s: 1.6 s steps stretched to 2.0 s). Metrics
    # go to Ray at most every `report_every_s` (rank 0's clock, agreed through the loss all-reduce: the report
    # is a barrier, every rank must make the same call); MLflow still gets every logged step.
    loop = _Loop(start_step=pos.step, ckpt_every=int(config.get("checkpoint_every_steps") or 0),
                 log_every=max(1, int(config.get("log_every_steps") or 1)),
                 report_every_s=float(config.get("report_every_s", 10.0)), fault=config.get("fault") or None)
    autocast = _autocast(w)
    model.train()
    while pos.step < plan.total_steps:
        _train_epoch(config, w, data, plan, model, peft_model, opt, pos, loop, autocast)
    if w.on_gpu:
        torch.cuda.synchronize()
    loop.loop_s, loop.loop_cpu_s = time.perf_counter() - loop.loop_t0, time.process_time() - loop.loop_cpu0
    if not loop.last and pos.history:  # resumed a run that had already finished
        loop.last = {"loss": pos.history[-1]["loss"], "step": pos.step}
    return loop


def _train_epoch(config: dict, w: _Worker, data: _Data, plan: _Plan, model, peft_model, opt: _Optim,
                 pos: _Position, loop: _Loop, autocast) -> None:
    """One epoch, or its rest after a resume: grad_accum micro-batches an optimizer step, then metrics,
    checkpoints and the tests' fault."""
    plan.sampler.set_epoch(pos.epoch)
    order = list(plan.sampler)
    batches = [order[i : i + plan.per_device] for i in range(0, len(order), plan.per_device)]
    while pos.micro_done < len(batches) and pos.step < plan.total_steps:
        units = batches[pos.micro_done : pos.micro_done + plan.grad_accum]
        sums = _forward_backward(w, data, plan, model, units, pos.step, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(opt.params, float(w.tcfg["max_grad_norm"]))
        opt.optimizer.step()
        opt.scheduler.step()
        opt.optimizer.zero_grad(set_to_none=True)
        pos.micro_done += sums.micro_batches
        pos.step += 1
        loop.window_tokens += sums.n_tokens
        loop.loop_tokens += sums.n_tokens
        epoch_done = pos.micro_done >= len(batches)

        if pos.step % loop.log_every == 0 or pos.step == plan.total_steps or epoch_done:
            _log_step(w, data, plan, opt, pos, loop, sums, grad_norm, len(batches), epoch_done)
        if epoch_done:
            pos.epoch, pos.micro_done = pos.epoch + 1, 0
        if pos.step < plan.total_steps and ((loop.ckpt_every and pos.step % loop.ckpt_every == 0) or epoch_done):
            _save_checkpoint(config, w.dist, peft_model, opt.optimizer, opt.scheduler, loop.last, loop.start_step,
                             pos.as_dict())
            loop.last_report_t = time.perf_counter()  # a checkpoint is a report too
        _inject_fault(loop.fault, pos.step, w.dist.rank)
        if epoch_done:
            break  # next epoch: a fresh shuffle


@dataclass
class _StepSums:
    """One optimizer step: this rank's loss sums, the global counts they are divided by, the tokens seen."""

    loss_sum: torch.Tensor
    kl_total: torch.Tensor
    n_target: float
    n_soft: float
    n_tokens: float
    micro_batches: int  # micro-batches of the epoch's order this step consumed (what `micro_done` counts): SFT's,
    # or the distribution objective's (its unit is a scenario); sft+distribution's soft labels have their own sampler


def _forward_backward(w: _Worker, data: _Data, plan: _Plan, model, units: list[list[int]], step: int,
                      autocast) -> _StepSums:
    """The forward and backward passes of one optimizer step: the distribution objective's micro-batches, then
    the SFT ones, gradients synced on the last. The loss is the exact token mean over the whole effective batch:
    the counts are all-reduced before the backward passes."""
    dist, device, weight = w.dist, w.device, data.weight
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    if data.objective == "distribution":
        group, soft_group = [], [[data.examples[j] for j in b] for b in units]
    else:
        group = [collate([data.examples[j] for j in b], data.pad_id, plan.pad_multiple) for b in units]
        soft_group = _soft_batches(plan, data.soft, step) if data.objective == "sft+distribution" else []
    counts = torch.tensor(
        [sum(int((g["labels"][:, 1:] != IGNORE_INDEX).sum()) for g in group),
         sum(int(g["attention_mask"].sum()) for g in group), sum(len(b) for b in soft_group)],
        dtype=torch.float64, device=device)
    counts = dist.all_reduce_sum(counts)
    n_target, n_tokens, n_soft = max(1.0, counts[0].item()), counts[1].item(), max(1.0, counts[2].item())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    kl_total = torch.zeros((), dtype=torch.float64, device=device)
    n_passes = len(group) + len(soft_group)
    for k, soft_rows in enumerate(soft_group):  # the distribution objective's micro-batches
        sync = (len(group) + k == n_passes - 1) or not ddp
        with (model.no_sync() if not sync else contextlib.nullcontext()):
            kl, soft_tokens = _distill_kl_sum(model, soft_rows, data.pad_id, device, autocast)
            (kl * (weight * dist.world / n_soft)).backward()
        kl_total += kl.detach().double()
        n_tokens += soft_tokens  # this rank's; the SFT count above is global (logged tokens/s: approximate)
    for k, g in enumerate(group):
        g = {key: v.to(device, non_blocking=True) for key, v in g.items()}
        sync = (k == len(group) - 1) or not ddp
        with (model.no_sync() if not sync else contextlib.nullcontext()):
            loss = _sft_loss_sum(model, g, autocast)
            # DDP averages gradients over ranks; x world makes the result sum / global target tokens.
            (loss * ((1.0 - weight) * dist.world / n_target)).backward()
        loss_sum += loss.detach().double()
    return _StepSums(loss_sum, kl_total, n_target, n_soft, n_tokens, len(units))


def _sft_loss_sum(model, g: dict[str, torch.Tensor], autocast) -> torch.Tensor:
    """The summed next-token cross-entropy over one micro-batch's target tokens. Logits only from the first
    position that predicts a target token on: the prompt is most of each sequence, and the LM head over a
    50-150k vocabulary is costly there."""
    labels = g["labels"][:, 1:]
    has_target = (labels != IGNORE_INDEX).any(dim=0)
    first = int(has_target.nonzero()[0]) if bool(has_target.any()) else labels.shape[1] - 1
    keep = labels.shape[1] - first
    with autocast:
        logits = model(input_ids=g["input_ids"], attention_mask=g["attention_mask"],
                       logits_to_keep=keep + 1).logits[:, :-1]
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels[:, first:].flatten(),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


def _log_step(w: _Worker, data: _Data, plan: _Plan, opt: _Optim, pos: _Position, loop: _Loop, sums: _StepSums,
              grad_norm, n_batches: int, epoch_done: bool) -> None:
    """A logged step: the global losses (one all-reduce, which also carries rank 0's decision to report to Ray),
    to MLflow every time, to Ray at most every report_every_s (checkpoints and the end report anyway)."""
    dist, device, weight = w.dist, w.device, data.weight
    due = float(dist.rank == 0 and time.perf_counter() - loop.last_report_t >= loop.report_every_s)
    summed = dist.all_reduce_sum(torch.stack([sums.loss_sum, sums.kl_total, torch.tensor(
        due, dtype=torch.float64, device=device)])).tolist()
    loss_sft, loss_dist, report_due = summed[0] / sums.n_target, summed[1] / sums.n_soft, summed[2] > 0
    global_loss = (1.0 - weight) * loss_sft + weight * loss_dist
    if w.on_gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - loop.window_t0
    last = {
        "loss": global_loss, "lr": opt.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
        "tokens_per_s": loop.window_tokens / dt if dt > 0 else 0.0, "step": pos.step,
        "epoch": pos.epoch + pos.micro_done / n_batches,
    }
    if data.objective != "sft":  # the parts: next-token cross-entropy, KL(teacher || student) per scenario
        last |= {"loss_distribution": loss_dist, **({"loss_sft": loss_sft} if sums.micro_batches else {})}
    loop.last = last
    pos.history.append({"step": pos.step, "loss": global_loss, "tokens_per_s": last["tokens_per_s"],
                        "window_s": dt, **({"loss_distribution": loss_dist} if data.objective != "sft" else {})})
    w.log.metrics({k: v for k, v in last.items() if k != "step"}, pos.step)
    loop.window_tokens, loop.window_t0 = 0, time.perf_counter()
    reports_anyway = (loop.ckpt_every and pos.step % loop.ckpt_every == 0) or epoch_done or \
        pos.step == plan.total_steps
    if w.use_ray and report_due and not reports_anyway:
        import ray.train

        ray.train.report(dict(last, start_step=loop.start_step))
        loop.ray_reports, loop.last_report_t = loop.ray_reports + 1, time.perf_counter()


def _inject_fault(fault: dict | None, step: int, rank: int) -> None:
    """Tests: rank `fault["rank"]` raises once after step `fault["at_step"]`, or SIGKILLs itself (`kill`)."""
    if fault and step == int(fault["at_step"]) and rank == int(fault.get("rank", 0)):
        marker = Path(fault["marker"])
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"fault injected at step {step} on rank {rank}\n")
            if fault.get("kill"):  # a dead process, not an exception: what a lost GPU node looks like
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def _save(config: dict, w: _Worker, data: _Data, plan: _Plan, peft_model, opt: _Optim, pos: _Position,
          loop: _Loop, run_params: dict) -> dict:
    """10. The end: checksums from every rank, the adapter in PEFT format, probe logits, MLflow; the result,
    reported to Ray Train with the final folder as the last checkpoint."""
    dist, history = w.dist, pos.history
    checksums = dist.all_gather_object(adapter_checksum(peft_model))
    result = {**loop.last, "objective": data.objective, "start_step": loop.start_step,
              "total_steps": plan.total_steps, "adapter_checksums": checksums,
              "adapters_identical": len(set(checksums)) == 1, "examples": len(data.examples),
              "loss_first": history[0]["loss"] if history else None,
              "loss_last": history[-1]["loss"] if history else None,
              "trainable_params": run_params["trainable_params"], "total_params": run_params["total_params"],
              "loop_tokens": loop.loop_tokens, "loop_s": loop.loop_s, "loop_cpu_s_rank0": loop.loop_cpu_s,
              "tokens_per_s_avg": loop.loop_tokens / loop.loop_s if loop.loop_s > 0 else 0.0,
              "ray_metric_reports": loop.ray_reports}
    if not w.use_ray:
        result["history"] = history  # per logged step: loss, tokens/s (benchmarks read it)
    final_dir = None
    if dist.rank == 0:
        final_dir = _save_final(config, w, data, peft_model, opt, pos, run_params, result)
    dist.barrier()
    if w.use_ray:
        import ray.train

        report = {k: v for k, v in result.items() if k != "adapter_dir"}
        if dist.rank == 0:
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(final_dir)))
            if not config.get("output_dir"):  # a temp dir, persisted to the run's storage by now (synchronous)
                shutil.rmtree(final_dir, ignore_errors=True)
                result.pop("adapter_dir", None)
        else:
            ray.train.report(report)
    return result


def _save_final(config: dict, w: _Worker, data: _Data, peft_model, opt: _Optim, pos: _Position,
                run_params: dict, result: dict) -> Path:
    """Rank 0: the adapter (PEFT format, the training config beside it), the trainer state, probe logits, and
    the MLflow artifacts and LoggedModel; `result` gains where they are. Returns the final folder."""
    tcfg, lcfg = w.tcfg, w.lcfg
    final_dir = Path(config.get("output_dir") or tempfile.mkdtemp(prefix="tomtransfer-final-"))
    adapter_dir = final_dir / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    peft_model.save_pretrained(str(adapter_dir))
    # The trainer state rides along, so a re-run of a finished run resumes at its last step (a no-op).
    torch.save({"optimizer": opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict(), "rng": _rng_state(),
                **pos.as_dict()}, final_dir / STATE_FILE)
    (adapter_dir / TRAINING_CONFIG_FILE).write_text(json.dumps(
        {"training": tcfg, "run_params": run_params, "student_path": str(config["student_path"]),
         "dataset_path": str(config["dataset_path"]), "seed": w.seed}, indent=1, default=str))
    probe_path = None
    n_probe = int(config.get("probe_examples", 2))
    if n_probe:
        probe_path = final_dir / PROBE_FILE
        _save_probe(peft_model, data.examples[:n_probe], data.pad_id, w.device, _autocast(w), probe_path)
    result |= w.log.final(adapter_dir, probe_path, str(tcfg["adapter_name"]), {
        "r": lcfg["r"], "alpha": lcfg["alpha"], "target_modules": ",".join(lcfg["target_modules"])})
    result["adapter_dir"] = str(adapter_dir)
    if w.log.client:
        w.log.metrics({"final_loss": result.get("loss") or 0.0}, pos.step)
    return final_dir

def _latest_checkpoint_dir(config: dict, use_ray: bool) -> str | None:
    if use_ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        # Local storage: the checkpoint folder is readable in place; remote storage gets downloaded.
        path = ckpt.path if os.path.isdir(ckpt.path) else ckpt.to_directory()
        return path if (Path(path) / STATE_FILE).is_file() else None
    resume = config.get("resume_from")
    if not resume:
        return None
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return str(p)
    steps = sorted(p.glob("step_*"), key=lambda q: int(q.name.split("_")[1])) if p.is_dir() else []
    steps = [s for s in steps if (s / STATE_FILE).is_file()]
    return str(steps[-1]) if steps else None


def _save_checkpoint(config, dist, peft_model, optimizer, scheduler, metrics, start_step, position) -> None:
    """Rank 0 writes adapter + trainer state; every rank calls report (it is a barrier in Ray Train)."""
    tmp = None
    if dist.rank == 0:
        tmp = Path(tempfile.mkdtemp(prefix="tomtransfer-ckpt-"))
        peft_model.save_pretrained(str(tmp / "adapter"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                    **position}, tmp / STATE_FILE)
    if dist.use_ray:
        import ray.train

        report = dict(metrics, start_step=start_step, checkpoint_step=position["step"])
        if dist.rank == 0:
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        else:
            ray.train.report(report)
        # The controller takes reports from each worker's one-slot queue once per poll (2 s); a worker that dies
        # before that poll takes the checkpoint's report with it, and the restarted group starts from scratch
        # (seen with a SIGKILL one step after a checkpoint). A second report waits for that slot to empty, i.e.
        # until the checkpoint is recorded: at most one poll interval per checkpoint.
        ray.train.report(dict(report, checkpoint_recorded=True))
    elif config.get("checkpoint_dir"):
        dest = Path(config["checkpoint_dir"]) / f"step_{position['step']:06d}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp, dest, dirs_exist_ok=True)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def _save_probe(peft_model, examples, pad_id, device, autocast, path: Path) -> None:
    was_training = peft_model.training
    peft_model.eval()
    batch = collate(examples, pad_id)
    with autocast:
        logits = peft_model(input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device)).logits
    torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "logits": logits.float().cpu()}, path)
    peft_model.train(was_training)


# ------------------------------------------------------------------------------------ the launcher
def resolve_student(name_or_path: str | Path) -> Path:
    """The student's weights folder: a local model folder as is; an alias or a cached hub id through the offline
    model store (`services.common.models.resolve_model`)."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    from tomtransfer.services.common.models import resolve_model

    return Path(resolve_model(str(name_or_path)))


def preflight(dataset_path: str | Path, student_path: str | Path, max_seq_len: int, *, objective: str = "sft",
              soft_labels_path: str | Path | None = None) -> dict:
    """Checks on the driver, before any worker starts: the training set reads, the student's tokenizer has a
    chat template that renders prompt-as-prefix, and some examples fit `max_seq_len`; for the distribution
    objectives, the soft-label set reads, is not empty and every action string tokenizes to something distinct
    with the student's tokenizer. Raises TrainError (a UserError: one line, exit 2)."""
    transformers = lean_transformers.load()

    from tomtransfer.services.trainer.dataset import read_training_set

    rows = read_training_set(dataset_path) if objective != "distribution" else []
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(student_path))
    except (OSError, ValueError) as err:
        raise TrainError(f"cannot load the student's tokenizer from {student_path}: {err}") from None
    if rows:
        encoded = [encode_example(tokenizer, r["messages"], r["target"], max_seq_len) for r in rows[:8]]
        if all(e is None for e in encoded):
            raise TrainError(f"prompts are longer than training.max_seq_len={max_seq_len}; raise it")
    out = {"examples": len(rows)}
    if objective != "sft":
        soft, _ = _encode_soft_labels(tokenizer, soft_labels_path, max_seq_len)
        out["soft_labels"] = len(soft)
    return out


def train_dir(cfg, dataset_path: str | Path, *, placebo: bool = False, soft_labels_key: str | None = None) -> Path:
    """`<run_dir>/train/<key>`: the key hashes the training set's content, the student's weights and the
    training settings (`services.common.fingerprint.train_key`), so Ray Train resumes only a run with the same
    inputs and a retrained adapter never hides behind an old one. `placebo`: the placebo adapter's (its own key).
    `soft_labels_key`: the key of the soft-label set built from the teacher, for an objective other than sft
    without `training.soft_labels` (the pipeline's train stage passes it)."""
    # shared.config (pydantic) comes with the fingerprint: lazy, the loop must import where pydantic is missing
    from tomtransfer.services.common.fingerprint import train_key

    key = train_key(cfg, Path(dataset_path), placebo=placebo, soft_labels_key=soft_labels_key)
    return Path(cfg.run_dir).resolve() / "train" / key


def worker_resources(t) -> dict[str, float]:
    """What the worker group of `training` (a TrainingConfig) asks of the Ray cluster."""
    return {"CPU": t.num_workers * t.cpus_per_worker, "GPU": float(t.num_workers if t.use_gpu else 0)}


def _resources_short(need: dict[str, float], settle_s: float = 60.0) -> list[str]:
    """The resources of `need` this local cluster cannot give, as readable lines; empty when the group fits.

    A need above the cluster's total fails at once. One within it but above what is free waits up to `settle_s`:
    a worker group that just ended gives its placement group back asynchronously, so `available_resources`
    lags behind the previous fit() by a moment (seen as "free: 0" right after another training run).
    """
    import ray  # the trainer's Ray import stays lazy: the module is read by CPU-only tools too

    total = ray.cluster_resources()
    deadline = time.monotonic() + (settle_s if all(need[k] <= total.get(k, 0.0) + 1e-9 for k in need) else 0.0)
    while True:
        free = ray.available_resources()
        short = [f"{need[k]:g} {k} (free: {free.get(k, 0.0):g})" for k in need if need[k] > free.get(k, 0.0) + 1e-9]
        if not short or time.monotonic() >= deadline:
            return short
        time.sleep(0.5)


def run_training(
    cfg,
    dataset_path: str | Path,
    student_path: str | Path,
    tracking_uri: str | None,
    run_id: str | None = None,
    *,
    out_dir: str | Path | None = None,
    checkpoint_every_steps: int = 0,
    extra_loop_config: dict | None = None,
    ray_init_kwargs: dict | None = None,
    placebo: bool = False,
    soft_labels_path: str | Path | None = None,
) -> dict:
    """Train `cfg.training` on Ray Train (`TorchTrainer`) and return the result dict.

    Storage: `out_dir/ray` (checkpoints; Ray Train run name `<cfg.name>-train`); `out_dir` defaults to
    `train_dir(cfg, dataset)`, a folder keyed by the inputs' fingerprint. Calling again with the same inputs resumes
    an interrupted run from its latest checkpoint (Ray Train V2 restores a run from its storage path and name;
    `TorchTrainer.restore/can_restore` are deprecated there). A worker failure restarts the worker group up to
    `training.max_failures` times, resuming from the latest checkpoint. MLflow: with `tracking_uri`, rank 0 logs into
    the existing run `run_id` (required then; the pipeline's train stage creates it, `stages.train_run`, and
    ends it); this function creates no run. The final adapter is copied to `out_dir/adapter`. `placebo`: the
    dataset is the placebo set and the adapter the placebo control (its own folder key). `soft_labels_path`: the
    soft-label set of `training.objective` distribution / sft+distribution (the placebo's: its permuted set)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.training
    dataset_path = Path(dataset_path).resolve()
    out_dir = Path(out_dir) if out_dir is not None else train_dir(cfg, dataset_path, placebo=placebo)
    storage = out_dir / "ray"
    name = f"{cfg.name}-train"
    if tracking_uri and not run_id:
        raise ValueError("run_training logs into an existing MLflow run: pass its run_id with tracking_uri")
    student = resolve_student(student_path).resolve()
    soft_labels_path = str(Path(soft_labels_path).resolve()) if soft_labels_path else None
    preflight(dataset_path, student, t.max_seq_len, objective=t.objective, soft_labels_path=soft_labels_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    resumed = (storage / name).is_dir() and (
        any((storage / name).glob("checkpoint_*")) or any((storage / name).glob("*snapshot*"))
    )

    loop_config = {
        "dataset_path": str(dataset_path),
        "soft_labels_path": soft_labels_path,
        "student_path": str(student),
        "training": t.model_dump(mode="json"),
        "use_ray": True,
        "use_gpu": bool(t.use_gpu),
        "seed": int(cfg.sampling.seed),
        "mlflow": {"tracking_uri": tracking_uri, "run_id": run_id} if tracking_uri else None,
        "checkpoint_every_steps": int(checkpoint_every_steps or t.checkpoint_every_steps),
        "compile": bool(t.compile),
        "gradient_checkpointing": bool(t.gradient_checkpointing),
        "num_threads": t.threads_per_worker or max(1, int(t.cpus_per_worker)),
        **(extra_loop_config or {}),
    }
    started_ray = False
    if not ray.is_initialized():
        ray.init(**({"include_dashboard": False} | (ray_init_kwargs or {})))
        started_ray = True
    if started_ray or not os.environ.get("RAY_ADDRESS"):
        # A local cluster does not autoscale: a worker group that cannot fit would wait out Ray's start-up
        # timeout and fail obscurely (e.g. serving replicas already hold the CPUs). Say so up front.
        short = _resources_short(worker_resources(t))
        if short:
            if started_ray:
                ray.shutdown()
            from tomtransfer.shared.errors import UserError

            raise UserError(f"training needs {', '.join(short)} on this Ray cluster: lower training.num_workers / "
                            "cpus_per_worker, or the serving replicas' num_cpus")
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=str(storage),
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
    finally:
        if started_ray:
            ray.shutdown()
    metrics = dict(result.metrics or {})
    adapter_dir = out_dir / "adapter"
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            if adapter_dir.exists():
                shutil.rmtree(adapter_dir)
            shutil.copytree(Path(d) / "adapter", adapter_dir)
            if (Path(d) / PROBE_FILE).is_file():
                shutil.copy2(Path(d) / PROBE_FILE, out_dir / PROBE_FILE)
    return {
        **metrics,
        "train_loss": metrics.get("loss"),
        "steps": metrics.get("step"),
        "run_id": run_id,
        "adapter_dir": str(adapter_dir),
        "adapter_uri": metrics.get("adapter_uri") or (f"runs:/{run_id}/adapter" if run_id else None),
        "checkpoint_path": result.checkpoint.path if result.checkpoint else None,
        "storage_path": str(storage / name),
        "resumed_run": resumed,
        "wall_s": wall,
    }
