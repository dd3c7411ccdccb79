"""What the serving API takes and answers: the request bodies, the OpenAI-style error, and how an engine-side
error crosses the Ray boundary from a replica (`pack_error`) back to the ingress (`unpack`).

No Ray, no HTTP server here: the ingress (services/teacher/ingress.py) validates bodies with these models, the
replica (services/teacher/replica.py) packs its errors with `pack_error`.
"""

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from tomtransfer.shared.errors import UserError

ROLES = ("teacher", "student")
ADAPTER_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


# ------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          409: "conflict_error", 413: "invalid_request_error", 502: "upstream_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def pack_error(e: Exception) -> dict:
    """An engine-side error as a plain value (crosses the Ray boundary without exception pickling)."""
    if isinstance(e, UserError):
        return {"error": {"status": getattr(e, "status", 400), "message": str(e), "param": getattr(e, "param", None),
                          "code": getattr(e, "code", None)}}
    raise e


def unpack(result: dict) -> Any:
    if "error" in result:
        err = result["error"]
        raise APIError(err["status"], err["message"], err.get("param"), err.get("code"))
    return result["ok"]


# -------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata, ...); unknown keys are ignored, but
    # options that would change results and that we do not implement are rejected explicitly below.
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(_Body):
    model: str
    messages: list[MessageIn] = Field(min_length=1)
    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    stop_at_answer: Literal["choice", "contribution"] | None = None
    endowment: int = Field(default=10, ge=0, le=10_000)
    # vLLM's names for choice-constrained sampling: `guided_choice` (older) or `structured_outputs.choice`.
    guided_choice: list[str] | None = Field(default=None, min_length=1)  # count capped by serving.max_guided_choices
    structured_outputs: dict[str, Any] | None = None

    def choices(self) -> tuple[str, ...] | None:
        if self.structured_outputs is not None:
            extra = set(self.structured_outputs) - {"choice"}
            if extra or not isinstance(self.structured_outputs.get("choice"), list):
                raise APIError(400, "structured_outputs: only {'choice': [...]} is supported", "structured_outputs")
            if not self.structured_outputs["choice"]:
                raise APIError(400, "structured_outputs.choice: give at least one choice", "structured_outputs")
            return tuple(str(c) for c in self.structured_outputs["choice"])
        return tuple(self.guided_choice) if self.guided_choice is not None else None


UNSUPPORTED_OPTIONS = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
                "prediction", "audio", "modalities")


class ExactBody(_Body):
    model: str
    messages: list[MessageIn] | None = None
    scenario: str | None = None
    instruction: Literal["answer_only", "answer_motivation"] = "answer_only"
    temperature: float | None = Field(default=None, ge=0, le=5)
    kind: Literal["choice", "contribution"] | None = None
    endowment: int | None = Field(default=None, ge=0, le=10_000)
    min_mass: float = Field(default=1e-6, gt=0, lt=0.1)
    max_depth: int = Field(default=8, ge=1, le=32)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    source: str = Field(min_length=1)
    replace: bool = False


def check_adapter_name(name: str) -> None:
    if not set(name) <= ADAPTER_NAME_CHARS:
        raise APIError(400, "adapter names may only hold letters, digits, '-', '_' and '.'", "name")
