"""Experiment configuration: one pydantic model, loaded from YAML, validated at the boundary.

Every stage (serve, generate, train, evaluate, run, sweep) reads the same `ExperimentConfig`.
Defaults are the paper's settings (arXiv 2408.05241 and its code, see
`../shared/reference/lfb/settings-as-found.json`): T=0.8, 300 samples, LoRA r=8 alpha=16 dropout 0
on q_proj/v_proj, lr 5e-5 cosine, 3 epochs, effective batch 64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from tomtransfer.shared.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Family = Literal["in_sample", "oos_context", "oos_game", "pgg"]
ALL_FAMILIES: tuple[Family, ...] = ("in_sample", "oos_context", "oos_game", "pgg")
Role = Literal["teacher", "student_base", "student_finetuned", "student_placebo"]
# student_placebo: the same recipe trained on the same dataset with the completions permuted across scenarios
# (`training.placebo`), a control measured exactly like student_finetuned.
ALL_ROLES: tuple[Role, ...] = ("teacher", "student_base", "student_finetuned", "student_placebo")
CORE_ROLES: tuple[Role, ...] = ("teacher", "student_base", "student_finetuned")  # what every evaluation has
Instruction = Literal["answer_only", "answer_motivation"]
# The paper (section 3, Fig. 1): "For LLaMa2-70b, we ask for an answer and a motivation; we ask the other models
# only for their answers." `answer_only` is every role on the answer-only prompt (this project before 2026-11-30).
PROTOCOLS: dict[str, dict[str, str]] = {
    "paper": {"teacher": "answer_motivation", "student_base": "answer_only", "student_finetuned": "answer_only",
              "student_placebo": "answer_only"},
    "answer_only": {"teacher": "answer_only", "student_base": "answer_only", "student_finetuned": "answer_only",
                    "student_placebo": "answer_only"},
}


class _Strict(BaseModel):
    # Unknown keys are typos, not extensions: reject them so a misspelt option never silently defaults.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecodingConfig(_Strict):
    """Knobs of the transformers engine's decoder (services/teacher/engines/decoding.py, `DecodingOptions`: same
    names and defaults). The CUDA ones do nothing on CPU; benchmarks/RESULTS.md has what they measured."""

    fast: bool = Field(
        default=True, description="the shared-prefix decoder for Llama-family models (the prompt's K/V read once "
        "per step for all rows); false: always the generic HF decoder")
    kv_budget_mb: float | None = Field(
        default=None, gt=0, description="memory for the per-row K/V of one decode chunk, which bounds the rows "
        "decoded together; null: 1024 on CPU, 40 % of the free GPU memory on CUDA")
    prefix_cache_mb: float = Field(
        default=256.0, ge=0, description="the system-turn K/V cache per replica (0: off); hits give the same "
        "numbers as misses")
    device_loop: bool | None = Field(
        default=None, description="sample on the device, no host sync per step (used for requests without "
        "logprobs, stop strings, stop_at_answer or guided_choice, T > 0); null: on CUDA")
    cuda_graphs: bool = Field(default=True, description="CUDA: capture the decode step and the prompt forward as "
                              "CUDA graphs")
    compile: bool = Field(
        default=False, description="CUDA: torch.compile the decode layer and the sampling draw, with the Triton "
        "suffix-attention kernel (0.90 -> 0.65 s on the GPU benchmark; ~10 s of compiling per new (rows, prompt "
        "bucket) shape)")
    span_bucket: int = Field(default=16, ge=1, description="CUDA graphs: suffix-length bucket of a captured step")
    prompt_bucket: int = Field(
        default=64, ge=1, description="CUDA graphs: prompt-length bucket (padding masked): one graph per bucket, "
        "not per length")
    graph_pool: int = Field(default=4, ge=1, description="CUDA graphs: decode shapes (rows, max_tokens, prompt "
                            "bucket) kept captured")
    graph_prefill_max: int = Field(
        default=1024, ge=0, description="CUDA graphs: the longest prompt whose forward runs as a graph (0: never)")


class ModelSpec(_Strict):
    """One served model: what weights, which engine, where it runs."""

    model: str = Field(description="alias (see `tomtransfer models list`), HF id or local path")
    engine: Literal["transformers", "vllm", "openai"] = "transformers"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # openai engine: a remote OpenAI-compatible endpoint (the paper used a hosted 70B teacher).
    base_url: str | None = None
    api_key_env: str | None = Field(default=None, description="name of the env var holding the API key")
    remote_model: str | None = Field(default=None, description="model name at the remote endpoint")
    remote_max_n: int = Field(default=128, ge=1, description="openai engine: `n` per upstream request (a larger n "
                              "is split; 128 is OpenAI's cap)")
    remote_timeout_s: float = Field(default=600.0, gt=0, description="openai engine: timeout of one upstream request")
    # resources for the Serve replica
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads of the transformers engine (default: num_cpus); more threads "
        "than reserved CPUs lets one busy model use an idle core, e.g. the teacher while the student waits")
    max_batch_size: int = Field(default=512, ge=1, description="sequences decoded together")
    decoding: DecodingConfig = Field(default_factory=DecodingConfig, description="transformers engine knobs")
    vllm_engine_kwargs: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "ModelSpec":
        if self.engine == "openai" and not self.base_url:
            raise ValueError("engine 'openai' needs base_url")
        return self


class ModelsConfig(_Strict):
    teacher: ModelSpec
    student: ModelSpec


class SamplingConfig(_Strict):
    temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=600, ge=1)
    seed: int = 0


class ScenarioSelection(_Strict):
    families: list[Family] = Field(default_factory=lambda: list(ALL_FAMILIES))
    ids: list[str] | None = Field(default=None, description="explicit scenario ids; overrides families")
    packs: list[Path] = Field(default_factory=list, description="extra scenario pack YAML files")


class ServingConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_n: int = Field(default=1000, ge=1, description="cap on `n` per request")
    max_tokens_cap: int = Field(default=4096, ge=1, description="cap on `max_tokens` per request")
    auth_token_env: str | None = Field(default=None, description="env var with a bearer token; unset = open")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="adapter name -> local path or mlflow artifact URI (student)"
    )
    base_url: str | None = Field(default=None, description="use an already running app instead of starting one")
    # Security (services/teacher/README.md, "Limits" and "Adapters").
    adapter_root: Path | Literal[False] | None = Field(
        default=None, description="the only folder `POST /v1/adapters` may load local adapters from (after "
        "symlinks; a relative source is relative to it); null: the run's folder (<output_dir>/<name>), where "
        "`tomtransfer run` trains its adapter; false: local paths refused (MLflow URIs only)")
    release_for_training: bool = Field(
        default=True, description="`tomtransfer run` with its own serving app: when the training workers cannot fit "
        "beside the app's replicas (one set of GPUs for both), the app steps aside while training and is deployed "
        "again for the evaluation")
    allow_open: bool = Field(
        default=False, description="let `tomtransfer serve` bind a non-loopback serving.host without "
        "auth_token_env (anyone who reaches the port can use the models)")
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="cap on a request body (413 above)")
    max_messages: int = Field(default=256, ge=1, description="cap on the number of messages per request")
    max_message_chars: int = Field(default=200_000, ge=1, description="cap on the characters of all messages")
    max_stop_strings: int = Field(default=16, ge=1, description="cap on the number of stop strings")
    max_guided_choices: int = Field(default=256, ge=1, description="cap on guided_choice / structured_outputs.choice")
    max_adapters: int = Field(default=16, ge=1, description="adapters kept loaded per student replica (least "
                              "recently used out)")


class GenerateConfig(_Strict):
    samples: int = Field(default=300, ge=1)
    families: list[Family] = Field(default_factory=lambda: ["in_sample"])
    instruction: Literal["answer_only", "answer_motivation"] = "answer_motivation"
    targets: Literal["answer_motivation", "answer"] = "answer_motivation"
    valid_policy: Literal["valid_only", "all"] = "valid_only"
    concurrency: int = Field(default=16, ge=1)
    request_n: int = Field(default=50, ge=1, description="samples asked for per HTTP request")


class LoraConfig(_Strict):
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class TrainingConfig(_Strict):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    learning_rate: float = Field(default=5e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    epochs: float = Field(default=3.0, gt=0)
    effective_batch_size: int = Field(default=64, ge=1)
    per_device_batch_size: int = Field(default=4, ge=1)
    max_seq_len: int = Field(default=1024, ge=16)
    max_grad_norm: float = Field(default=1.0, gt=0)
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    threads_per_worker: int | None = Field(default=None, ge=1, description="torch CPU threads (default: cpus_per_worker)")
    max_failures: int = Field(default=1, ge=0)
    checkpoint_every_steps: int = Field(default=0, ge=0, description="0: a checkpoint at every epoch end only")
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="the frozen base weights' dtype, and the autocast of the forward pass (LoRA "
        "weights and optimizer state stay fp32): auto = bfloat16 on GPU, float32 on CPU; bfloat16 on CPU halves "
        "the step time where the CPU computes bf16 natively (AMX / AVX512-BF16; benchmarks/RESULTS.md, 'Training "
        "in bf16 on CPU'), elsewhere it can be slower than float32. Part of the adapter's fingerprint where it "
        "differs from auto's choice")
    compile: bool = Field(default=False, description="torch.compile the model (fixed-length batches recompile less)")
    adapter_name: str = "tom"
    placebo: bool = Field(
        default=False, description="also train a placebo control, `<adapter_name>-placebo`: the same recipe on the "
        "same training set with the completions (answer and motivation together) permuted across scenarios by a "
        "permutation seeded with sampling.seed (prompts kept; every completion moved to another scenario's prompt "
        "where possible; 2x2 and public-goods completions permuted among their own kind), so the format and the "
        "overall C share stay and the scenario -> choice mapping goes; served beside the real adapter and "
        "evaluated as the role student_placebo, exactly like student_finetuned. The dataset and the real adapter "
        "are reused (this switch is not part of their fingerprints)")
    objective: Literal["sft", "distribution", "sft+distribution"] = Field(
        default="sft", description="sft: the paper's objective (next-token cross-entropy on the teacher's sampled "
        "text); distribution: forward KL from the teacher's per-scenario choice distribution among valid answers "
        "(the soft-label set: exact mode where the teacher's answer leads, its samples otherwise) to the student's "
        "distribution over the action strings under the instruction it is evaluated with; sft+distribution: "
        "(1 - distribution_weight) * sft + distribution_weight * distribution (services/trainer/softlabels.py)")
    distribution_weight: float = Field(
        default=0.5, description="sft+distribution only: the distribution loss's weight w, 0 < w < 1")
    soft_labels: str | None = Field(
        default=None, description="a soft-label set (its soft_labels.parquet or folder) to distil instead of the one "
        "built from the teacher (objective distribution / sft+distribution)")

    @field_validator("distribution_weight")
    @classmethod
    def _weight_ok(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"distribution_weight must be strictly between 0 and 1 (the loss is (1 - w) * sft + "
                             f"w * distribution), got {v}")
        return v

    @field_validator("adapter_name")
    @classmethod
    def _adapter_name_ok(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("adapter_name may only hold letters, digits, '-', '_' and '.'")
        return v

    @model_validator(mode="after")
    def _batch_fits(self) -> "TrainingConfig":
        # one micro-batch on every worker is the smallest step: past the effective batch it would silently grow
        step = self.per_device_batch_size * self.num_workers
        if step > self.effective_batch_size:
            fix = (f"set per_device_batch_size to {self.effective_batch_size // self.num_workers} or fewer"
                   if self.effective_batch_size >= self.num_workers else
                   f"use at most {self.effective_batch_size} workers")
            raise ValueError(f"per_device_batch_size {self.per_device_batch_size} x num_workers {self.num_workers} = "
                             f"{step} is more than effective_batch_size {self.effective_batch_size}: {fix}")
        return self


class EvaluateConfig(_Strict):
    roles: list[Role] = Field(
        default_factory=lambda: list(CORE_ROLES), description="default: teacher, student_base, student_finetuned, "
        "and student_placebo when training.placebo is on")
    families: list[Family] = Field(default_factory=lambda: list(ALL_FAMILIES))
    samples: int = Field(default=300, ge=1, description="N per (role, scenario) for sampled roles")
    exact_n: int | None = Field(
        default=None, ge=2, description="effective n of exact roles for Table 1, unstable flags and PGG standard "
        "errors (default: samples)")
    estimator: Literal["sample", "exact"] = Field(
        default="sample", description="exact: noise-free probabilities of the leading answer, used only for roles "
        "whose instruction puts the answer first (answer_only); a role asked for a motivation is always sampled and "
        "parsed with the full rule, since its answer may come after prose")
    protocol: Literal["paper", "answer_only"] = Field(
        default="paper", description="paper: the teacher answers with a motivation, the students answer only (the "
        "paper's section 3); answer_only: every role on the answer-only prompt")
    instructions: dict[Role, Instruction] = Field(
        default_factory=dict, description="per-role prompt overrides on top of the protocol")
    teacher_reference: Literal["dataset", "evaluate"] | None = Field(
        default=None, description="dataset: on scenarios the teacher dataset covers, the teacher's rates are its "
        "generated samples (the paper's teacher counts, no second pass; needs generate.instruction = the teacher's "
        "evaluation instruction), other scenarios are evaluated; evaluate: a fresh evaluation everywhere; "
        "default: dataset where the instructions match, else evaluate")
    rate: Literal["count", "conditional"] = Field(
        default="count", description="the rate improvement is computed from: count = C out of all N (the paper's "
        "counts, invalid counts as not C); conditional = C out of valid answers")
    min_valid_share: float = Field(
        default=0.1, ge=0, le=1, description="a scenario where a role's valid share is below this is flagged; under "
        "the conditional rate (whose denominator it is) it is left out of the aggregates")
    max_tokens: int = Field(default=16, ge=1, description="answer-only roles")
    motivation_max_tokens: int | None = Field(
        default=None, ge=1, description="roles asked for a motivation (default: sampling.max_tokens)")
    concurrency: int = Field(default=16, ge=1)
    request_n: int = Field(default=50, ge=1)
    bootstrap: int = Field(default=2000, ge=100)
    teacher_lead: bool | None = Field(
        default=None, description="a teacher reference that can carry a denominator: one exact-mode call per 2x2 "
        "scenario for the teacher under its own evaluation instruction, beside its samples (the dataset's or fresh "
        "ones). Exact mode reads only the leading answer, so p_C/p_D are the mass where the teacher's answer leads; "
        "the samples whose response has no leading letter give the rest: P(C) = P(leading C) + P(no leading "
        "letter) * P(C | no leading letter). Rows: role teacher, part 'lead' in the evaluation's exact results. "
        "Not for the PGG (its samples stay the reference) nor where the teacher is itself exact. Default: on when "
        "the estimator is exact")
    role_order: Literal["auto", "interleaved", "grouped"] = Field(
        default="auto", description="interleaved: scenario by scenario, so the teacher's and the student's replicas "
        "work at the same time (separate GPUs/nodes); grouped: one role's requests after the other's (replicas that "
        "share CPU cores then do not slow each other down); auto: grouped when both models are local CPU "
        "transformers replicas, else interleaved")

    def instruction_for(self, role: str) -> Instruction:
        if role == "student_placebo" and role not in self.instructions:  # the placebo is measured as the real one
            role = "student_finetuned"
        return self.instructions.get(role) or PROTOCOLS[self.protocol][role]  # type: ignore[return-value]

    @property
    def teacher_lead_on(self) -> bool:
        """Whether the teacher's leading-answer mass is measured in exact mode (`teacher_lead`, resolved): only where
        the teacher is evaluated and sampled (an exact teacher's rows are already the whole of it)."""
        on = self.estimator == "exact" if self.teacher_lead is None else self.teacher_lead
        return on and "teacher" in self.roles and self.estimator_for("teacher") == "sample"

    def estimator_for(self, role: str) -> Literal["sample", "exact"]:
        """Exact mode reads only the leading answer: sound only where the prompt puts the answer first."""
        return "exact" if self.estimator == "exact" and self.instruction_for(role) == "answer_only" else "sample"

    def protocol_line(self, teacher_from_dataset: bool = False) -> str:
        """One line that says how each role is measured (printed, in the report, an MLflow param)."""
        parts = []
        for role in self.roles:
            how = self.estimator_for(role)
            if role == "teacher" and teacher_from_dataset:
                how = "its generated dataset where that covers the scenario, else sampled"
            if role == "teacher" and self.teacher_lead_on:
                how += "; exact leading-answer mass on the 2x2 games"
            parts.append(f"{role} {self.instruction_for(role)} ({how})")
        return (f"protocol {self.protocol}: " + "; ".join(parts) + f"; rate = {self.rate} "
                f"({'C out of N' if self.rate == 'count' else 'C out of valid answers'}); "
                f"min valid share {self.min_valid_share:g}")


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(default=None, description="None: `run` starts a local server")
    experiment: str = "tomtransfer"


class ExperimentConfig(_Strict):
    name: str = "experiment"
    output_dir: Path = Path("runs")
    models: ModelsConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    scenarios: ScenarioSelection = Field(default_factory=ScenarioSelection)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("name may only hold letters, digits, '-', '_' and '.'")
        return v

    @model_validator(mode="after")
    def _dataset_reference_matches(self) -> "ExperimentConfig":
        e = self.evaluate
        if e.teacher_reference == "dataset" and e.instruction_for("teacher") != self.generate.instruction:
            raise ValueError(f"evaluate.teacher_reference 'dataset' needs the teacher evaluated with the dataset's "
                             f"instruction ({self.generate.instruction}), not {e.instruction_for('teacher')}; set "
                             f"teacher_reference: evaluate")
        return self

    @model_validator(mode="after")
    def _placebo_roles(self) -> "ExperimentConfig":
        e = self.evaluate
        if "roles" not in e.model_fields_set:
            # the default follows training.placebo; resolved here, not marked as set, so a sweep cell that turns
            # the placebo on gets the role too (shared.sweep re-derives what its base did not set)
            if self.training.placebo and "student_placebo" not in e.roles:
                ev = e.model_copy()
                object.__setattr__(ev, "roles", [*e.roles, "student_placebo"])
                object.__setattr__(self, "evaluate", ev)
        elif "student_placebo" in e.roles and not self.training.placebo:
            raise ValueError("evaluate.roles: student_placebo needs training.placebo: true (the placebo adapter is "
                             "trained only then)")
        return self

    @property
    def teacher_from_dataset(self) -> bool:
        """Whether the teacher's reference is its generated dataset (where that covers a scenario)."""
        e = self.evaluate
        if "teacher" not in e.roles or e.teacher_reference == "evaluate":
            return False
        return e.instruction_for("teacher") == self.generate.instruction

    def protocol_line(self) -> str:
        return self.evaluate.protocol_line(self.teacher_from_dataset)

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


class ConfigError(UserError):
    """A config that cannot be used; its message is one line meant for the user."""


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<root>"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_config(data: object, source: str = "<config>") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_one_line(err)}") from None


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.object[err.start]:#04x}); save the config "
                          f"as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None
    cfg = parse_config(data, str(path))
    # Relative pack paths are relative to the config file, like includes in any config language.
    packs = [p if p.is_absolute() else (path.parent / p) for p in cfg.scenarios.packs]
    return cfg.model_copy(update={"scenarios": cfg.scenarios.model_copy(update={"packs": packs})})
