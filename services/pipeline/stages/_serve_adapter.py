"""The serve-adapter stage: a trained adapter registered on the running app (multi-LoRA) under its served name
(`student:<training.adapter_name>`, the placebo's `-placebo`). No input key, stages.json entry or MLflow run of its
own: its outcome, the adapter's identity (`adapter_identity`: the content hash), is part of the evaluate stage's
key (the fine-tuned / placebo student's store)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tomtransfer.shared.config import ExperimentConfig
from tomtransfer.shared.errors import UserError
from tomtransfer.shared.samples import adapter_name

from tomtransfer.services.common.fingerprint import dir_sha256
from tomtransfer.services.pipeline.stages._common import Context


def adapter_identity(adapter_dir: str | Path) -> dict:
    """What the fine-tuned student's answers depend on besides the base weights: the adapter's content."""
    return {"sha256": dir_sha256(Path(adapter_dir))}


def serve_adapter(cfg: ExperimentConfig, ctx: Context, adapter_dir: str | Path, *,
                  role: str = "student_finetuned") -> dict:
    """Register the adapter on the running app as `student:<training.adapter_name>` (`role` student_placebo:
    `student:<training.adapter_name>-placebo`); returns its identity."""
    name = adapter_name(role, cfg.training.adapter_name)
    headers = {"Authorization": f"Bearer {ctx.api_key}"} if ctx.api_key else {}
    r = httpx.post(f"{ctx.url.rstrip('/')}/adapters", json={"name": name, "source": str(adapter_dir), "replace": True},
                   headers=headers, timeout=600)
    if r.status_code >= 400:
        raise UserError(f"the serving app refused adapter {name} ({adapter_dir}): {r.status_code} {r.text[:200]}")
    return adapter_identity(adapter_dir)
