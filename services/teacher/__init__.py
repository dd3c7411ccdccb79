"""The serving app: teacher and student behind one OpenAI-compatible API on Ray Serve (schemas, adapters,
the engine replica, the HTTP ingress), exact mode, and the engines (engines/)."""

from tomtransfer._exports import lazy

_PUBLIC = {
    "build_app": "app",
    "start": "serving",
    "stop": "serving",
    "init_ray": "serving",
    "Engine": "engines.base",
    "create_engine": "engines.base",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy(__name__, _PUBLIC)
