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
from shared.errors import UserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Family = Literal["in_sample", "oos_context", "oos_game", "pgg"]
ALL_FAMILIES: tuple[Family, ...] = ("in_sample", "oos_context", "oos_game", "pgg")
Role = Literal["teacher", "student_base", "student_finetuned"]
ALL_ROLES: tuple[Role, ...] = ("teacher", "student_base", "student_finetuned")


class _Strict(BaseModel):
    # Unknown keys are typos, not extensions: reject them so a misspelt option never silently defaults.
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    # resources for the Serve replica
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads of the transformers engine (default: num_cpus); more threads "
        "than reserved CPUs lets one busy model use an idle core, e.g. the teacher while the student waits")
    max_batch_size: int = Field(default=512, ge=1, description="sequences decoded together")
    compile: bool = Field(
        default=False, description="transformers engine on CUDA: torch.compile the decode layer and sampling draw "
        "(faster steps; ~10 s of compiling per new batch shape); env TOMTRANSFER_COMPILE=1 does the same")
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
    compile: bool = Field(default=False, description="torch.compile the model (fixed-length batches recompile less)")
    adapter_name: str = "tom"

    @field_validator("adapter_name")
    @classmethod
    def _adapter_name_ok(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("adapter_name may only hold letters, digits, '-', '_' and '.'")
        return v


class EvaluateConfig(_Strict):
    roles: list[Role] = Field(default_factory=lambda: list(ALL_ROLES))
    families: list[Family] = Field(default_factory=lambda: list(ALL_FAMILIES))
    samples: int = Field(default=300, ge=1)
    estimator: Literal["sample", "exact"] = "sample"
    instruction: Literal["answer_only", "answer_motivation"] = "answer_only"
    max_tokens: int = Field(default=16, ge=1)
    concurrency: int = Field(default=16, ge=1)
    request_n: int = Field(default=50, ge=1)
    bootstrap: int = Field(default=2000, ge=100)
    role_order: Literal["auto", "interleaved", "grouped"] = Field(
        default="auto", description="interleaved: scenario by scenario, so the teacher's and the student's replicas "
        "work at the same time (separate GPUs/nodes); grouped: one role's requests after the other's (replicas that "
        "share CPU cores then do not slow each other down); auto: grouped when both models are local CPU "
        "transformers replicas, else interleaved")


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
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None
    cfg = parse_config(data, str(path))
    # Relative pack paths are relative to the config file, like includes in any config language.
    packs = [p if p.is_absolute() else (path.parent / p) for p in cfg.scenarios.packs]
    return cfg.model_copy(update={"scenarios": cfg.scenarios.model_copy(update={"packs": packs})})
