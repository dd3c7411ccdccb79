"""The engine interface every serving backend implements, and the registry keyed by `ModelSpec.engine`.

An engine owns one base model (plus, where it supports them, LoRA adapters on it) and answers:

    await engine.chat(ChatRequest)     -> ChatResult      n samples from one chat, OpenAI semantics
    await engine.exact(ExactRequest)   -> ExactResult     answer probabilities from forward passes
    await engine.load_adapter(name, path)                 a local peft adapter folder
    await engine.unload_adapter(name)
    engine.models()                    -> list[str]       loaded adapter names
    engine.info()                      -> dict            engine name, model path, capabilities

Requests carry `adapter` (None = the base model). Engines raise `EngineInputError` (or any
`shared.errors.UserError`) for requests they cannot serve (prompt too long, unknown adapter, unsupported
parameter); the HTTP layer maps those to 400/404, everything else to 500.

Adding an engine (e.g. vLLM): write `services/teacher/engines/<name>_engine.py` with a class implementing
`Engine`, whose constructor is `Engine(spec: ModelSpec, *, model_path: str | None)`, and add it to
`ENGINES` below (already reserved for `vllm`: `services.teacher.engines.vllm_engine:VLLMEngine`).
Engines are imported lazily, so a missing optional backend only fails when a config asks for it.

Exact mode contract (see `services.teacher.exact` for the definition and the reference implementation
over next-token distributions): `ExactResult.p` maps each answer ("C"/"D", or "0".."endowment" for a
PGG) to the probability that a response sampled at temperature T *starts with* that answer per
`shared.parsing`'s leading rule; `valid_mass = sum(p)`, `invalid_mass` = mass that provably does not
start with a valid answer, `unresolved_mass` = mass the expansion did not decide (tiny; reported so
that `valid + invalid + unresolved = 1`).
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tomtransfer.shared.errors import UserError

Message = dict[str, str]


# Chat-template end markers of the supported families (ChatML/Qwen, Llama 2/3, SmolLM2, Phi): also stop decoding.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")


def end_token_ids(tokenizer, *eos_sources) -> set[int]:
    """Token ids that end a response: the EOS id(s) given (int, list or None each) plus the END_TOKENS that
    this tokenizer has as special tokens."""
    ids: set[int] = set()
    for src in eos_sources:
        if src is not None:
            ids.update(src if isinstance(src, (list, tuple)) else [src])
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens) | {str(t) for t in getattr(tokenizer, "added_tokens_encoder", {})}
    ids.update(vocab[tok] for tok in END_TOKENS if tok in vocab and tok in special)
    return {int(i) for i in ids}


class EngineInputError(UserError):
    """A request this engine cannot serve; maps to HTTP 400 (`status` may say 404)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


# --------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20; only with logprobs
    ignore_eos: bool = False  # extension (vLLM has it): decode exactly max_tokens tokens
    # extension: end each sample as soon as its leading answer is decided (see services.teacher.exact):
    # "choice" (C/D) or "contribution" (0..endowment). The text is the prefix that decided it.
    stop_at_answer: Literal["choice", "contribution"] | None = None
    endowment: int = 10
    # extension (vLLM structured outputs): every sample is exactly one of these strings; engines that cannot
    # constrain decoding refuse it (EngineInputError -> HTTP 400) rather than ignore it.
    guided_choice: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    # The remote model name for the openai engine; ignored by local engines.
    request_id: str | None = None


@dataclass(frozen=True)
class ExactRequest:
    messages: tuple[Message, ...]
    temperature: float = 0.8
    kind: Literal["choice", "contribution"] = "choice"
    endowment: int = 10  # for kind == "contribution": answers 0..endowment
    adapter: str | None = None
    # Expansion limits (see services.teacher.exact): stop expanding below this probability, or past depth.
    min_mass: float = 1e-6
    max_depth: int = 8


# ---------------------------------------------------------------------------------------- results
@dataclass
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int] | None


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    num_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass
class ChatResult:
    choices: list[Completion]
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ExactResult:
    kind: str
    temperature: float
    p: dict[str, float]  # answer -> probability
    valid_mass: float
    invalid_mass: float
    unresolved_mass: float
    forward_passes: int
    prompt_tokens: int
    method: str = "tree"  # "tree": exact expansion over full distributions; "top_logprobs": approximate
    approximate: bool = False
    top_tokens: list[dict[str, Any]] = field(default_factory=list)  # the first step's most likely tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.kind == "choice":
            d["p_C"] = self.p.get("C", 0.0)
            d["p_D"] = self.p.get("D", 0.0)
            d["p_C_given_valid"] = d["p_C"] / self.valid_mass if self.valid_mass > 0 else None
        else:
            d["contributions"] = {k: v for k, v in self.p.items()}
            d["mean_given_valid"] = (
                sum(int(k) * v for k, v in self.p.items()) / self.valid_mass if self.valid_mass > 0 else None
            )
        return d


# -------------------------------------------------------------------------------------- interface
class Engine(abc.ABC):
    """One model (+ adapters). Methods are async; engines do heavy work off the event loop."""

    name: str = "base"
    supports_adapters: bool = False

    @abc.abstractmethod
    async def chat(self, request: ChatRequest) -> ChatResult: ...

    @abc.abstractmethod
    async def exact(self, request: ExactRequest) -> ExactResult: ...

    async def load_adapter(self, name: str, path: str) -> None:
        raise EngineInputError(f"engine {self.name!r} does not support adapters", param="model")

    async def unload_adapter(self, name: str) -> None:
        raise EngineInputError(f"engine {self.name!r} does not support adapters", param="model")

    def models(self) -> list[str]:
        """Names of the loaded adapters."""
        return []

    def info(self) -> dict[str, Any]:
        return {"engine": self.name, "adapters": self.supports_adapters}

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, GPU memory, HTTP clients)."""


ENGINES: dict[str, str] = {
    "transformers": "tomtransfer.services.teacher.engines.transformers_engine:TransformersEngine",
    "openai": "tomtransfer.services.teacher.engines.openai_engine:OpenAIEngine",
    "vllm": "tomtransfer.services.teacher.engines.vllm_engine:VLLMEngine",
}


def engine_class(kind: str) -> type[Engine]:
    try:
        target = ENGINES[kind]
    except KeyError:
        raise UserError(f"unknown engine {kind!r}; known: {', '.join(ENGINES)}") from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise UserError(f"engine {kind!r} is not available in this installation ({module_name} missing)") from None
        raise UserError(f"engine {kind!r} needs a package that is not installed: {e.name}") from None
    return getattr(module, cls_name)


def create_engine(spec, *, model_path: str | None = None) -> Engine:
    """Instantiate the engine a `shared.config.ModelSpec` asks for. `model_path` overrides resolution."""
    return engine_class(spec.engine)(spec, model_path=model_path)
