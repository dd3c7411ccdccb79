"""The engines behind a replica: transformers (the CPU default, with its CUDA fast path), vLLM, and a
remote OpenAI-compatible endpoint; `create_engine` picks one from a ModelSpec."""

from tomtransfer._exports import lazy

_PUBLIC = {
    "Engine": "base",
    "EngineInputError": "base",
    "ChatRequest": "base",
    "ExactRequest": "base",
    "SamplingParams": "base",
    "create_engine": "base",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy(__name__, _PUBLIC)
