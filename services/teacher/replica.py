"""The engine replica: one Serve deployment per role (`tomtransfer-teacher`, `tomtransfer-student`), one engine
each (chosen by `models.<role>.engine` through the registry in `engines/base.py`), plus the adapters it loads on
first use (services/teacher/adapters.py), least recently used out.
"""

import logging
import os
from collections import OrderedDict
from typing import Any

from ray import serve

from tomtransfer.services.teacher.adapters import AdapterPolicy, AdapterSourceError, fetch_adapter
from tomtransfer.services.teacher.schemas import pack_error

log = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=256, health_check_period_s=30, health_check_timeout_s=60)
class ModelServer:
    """One engine (teacher or student) + lazily loaded adapters. Methods return {"ok": ...} or {"error": ...}."""

    def __init__(self, role: str, spec: dict, tracking_uri: str | None = None, adapter_root: str | None = None,
                 max_adapters: int = 16):
        from tomtransfer.services.teacher.engines.base import engine_class
        from tomtransfer.shared.config import ModelSpec

        self.role = role
        self.spec = ModelSpec.model_validate(spec)
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        cls = engine_class(self.spec.engine)
        kwargs: dict[str, Any] = {}
        if self.spec.engine == "transformers":
            kwargs["threads"] = self.spec.threads or max(1, int(round(self.spec.num_cpus)))
        self.engine = cls(self.spec, **kwargs)
        self.policy = AdapterPolicy(adapter_root, self.tracking_uri)
        # adapter name -> (source, restricted), LRU order
        self.sources: OrderedDict[str, tuple[str, bool]] = OrderedDict()
        self.max_adapters = max_adapters  # serving.max_adapters

    async def _ensure_adapter(self, name: str, source: str, restricted: bool = False) -> None:
        """Load adapter `name` from `source` unless loaded; `restricted`: a source from POST /v1/adapters,
        limited by the policy, and every failure (refused, missing, unloadable) is the one AdapterSourceError."""
        if self.sources.get(name) == (source, restricted):
            self.sources.move_to_end(name)
            return
        import asyncio

        loop = asyncio.get_running_loop()
        if restricted:
            try:
                path = await loop.run_in_executor(None, fetch_adapter, source, self.tracking_uri, self.policy)
                await self.engine.load_adapter(name, path)
            except Exception as e:  # noqa: BLE001 - one answer for every failure; the reason is logged here
                reason = e.reason if isinstance(e, AdapterSourceError) else f"{type(e).__name__}: {e}"
                log.warning("adapter %r: source %r refused: %s", name, source[:300], str(reason)[:500])
                raise AdapterSourceError(reason) from None
        else:
            path = await loop.run_in_executor(None, fetch_adapter, source, self.tracking_uri)
            await self.engine.load_adapter(name, path)
        self.sources[name] = (source, restricted)
        self.sources.move_to_end(name)
        while len(self.sources) > self.max_adapters:
            old, _ = self.sources.popitem(last=False)
            await self.engine.unload_adapter(old)

    async def chat(self, request, adapter_source: str | None = None, restricted: bool = False) -> dict:
        try:
            if request.adapter is not None:
                await self._ensure_adapter(request.adapter, adapter_source, restricted)
            return {"ok": await self.engine.chat(request)}
        except Exception as e:  # noqa: BLE001 - user errors become values, others propagate
            return pack_error(e)

    async def exact(self, request, adapter_source: str | None = None, restricted: bool = False) -> dict:
        try:
            if request.adapter is not None:
                await self._ensure_adapter(request.adapter, adapter_source, restricted)
            return {"ok": (await self.engine.exact(request)).to_dict()}
        except Exception as e:  # noqa: BLE001
            return pack_error(e)

    async def load_adapter(self, name: str, source: str, restricted: bool = False) -> dict:
        try:
            self.sources.pop(name, None)
            await self._ensure_adapter(name, source, restricted)
            return {"ok": True}
        except Exception as e:  # noqa: BLE001
            return pack_error(e)

    async def unload_adapter(self, name: str) -> dict:
        if name in self.sources:
            self.sources.pop(name)
            try:
                await self.engine.unload_adapter(name)
            except Exception as e:  # noqa: BLE001
                return pack_error(e)
        return {"ok": True}

    async def info(self) -> dict:
        return {"ok": {"role": self.role, **self.engine.info()}}
