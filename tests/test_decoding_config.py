"""The engines' knobs live in the validated config: `models.<role>.decoding`, `serving.max_adapters` and the
openai engine's `remote_max_n` / `remote_timeout_s`.

Covers: the config's decoding section and the engine's `DecodingOptions` have the same knobs and defaults; each knob
set in a config reaches the engine through the spec dict the app hands to a replica (and, for the CUDA ones, the
CUDA fast path's decoder, built here on CPU); the device loop, forced on CPU, draws the same samples as the host
loop; an unknown or a moved knob is a one-line config error with exit 2; `serving.max_adapters` bounds the adapters
a replica keeps loaded; the openai engine takes its split and timeout from the spec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_models import tiny_model_dir
from tomtransfer.services.teacher.engines.base import ChatRequest, SamplingParams
from tomtransfer.services.teacher.engines.cuda_fastpath import CudaGraphDecoder
from tomtransfer.services.teacher.engines.decoding import DecodingOptions, HFDecoder, SharedPrefixDecoder
from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine
from tomtransfer.shared.config import DecodingConfig, ModelSpec, parse_config

ROOT = Path(__file__).resolve().parents[1]
MSGS = ({"role": "system", "content": "Answer with C or D."}, {"role": "user", "content": "Which one, C or D?"})
# every knob away from its default
KNOBS = {"fast": True, "kv_budget_mb": 0.5, "prefix_cache_mb": 0, "device_loop": True, "cuda_graphs": False,
         "compile": True, "span_bucket": 8, "prompt_bucket": 32, "graph_pool": 2, "graph_prefill_max": 0}


def test_config_and_engine_options_agree():
    config = {name: f.default for name, f in DecodingConfig.model_fields.items()}
    engine = {f.name: f.default for f in dataclasses.fields(DecodingOptions)}
    assert config == engine
    assert set(KNOBS) == set(config) and all(KNOBS[k] != config[k] for k in KNOBS if k != "fast")
    assert all(f.description for f in DecodingConfig.model_fields.values())


def test_knobs_reach_the_engine_through_the_replica_spec():
    path = str(tiny_model_dir("llama", seed=3))
    cfg = parse_config({"models": {"teacher": {"model": path}, "student": {"model": path, "device": "cpu",
                                                                           "decoding": KNOBS}}})
    # what build_app binds and ModelServer validates again
    spec = ModelSpec.model_validate(cfg.models.student.model_dump(mode="json"))
    assert spec.decoding == DecodingConfig(**KNOBS) and cfg.models.teacher.decoding == DecodingConfig()
    eng = TransformersEngine(spec)
    try:
        assert eng.options == DecodingOptions(**KNOBS)
        assert (eng.compile, eng.graphs, eng.device_loop) == (True, False, True)
        assert eng.prefixes.budget == 0
        # 0.5 MB of K/V (float32) per chunk: K and V of every layer and KV head, per row and slot
        m = eng.base.config
        head_dim = getattr(m, "head_dim", None) or m.hidden_size // m.num_attention_heads
        per_slot = 2 * m.num_hidden_layers * m.num_key_value_heads * head_dim * 4
        assert eng._rows_per_chunk(64) == min(eng.max_batch_size, int(0.5 * 2**20 // (per_slot * 64)))
        assert eng._rows_per_chunk(64) < TransformersEngine(ModelSpec(model=path, device="cpu"))._rows_per_chunk(64)
        cuda = CudaGraphDecoder(eng.model, eng.options)
        assert (cuda.compile, cuda.span_bucket, cuda.prompt_bucket, cuda.pool_size, cuda.graph_prefill_max) == \
            (True, 8, 32, 2, 0)
        assert not cuda.graphs and cuda._layer is None  # CPU: the CUDA parts stay off
    finally:
        asyncio.run(eng.close())


def test_fast_false_is_the_generic_decoder():
    path = str(tiny_model_dir("llama", seed=3))
    slow = TransformersEngine(ModelSpec(model=path, device="cpu", decoding={"fast": False}))
    fast = TransformersEngine(ModelSpec(model=path, device="cpu"))
    try:
        assert isinstance(slow.decoder, HFDecoder) and type(fast.decoder) is SharedPrefixDecoder
        assert slow.info()["decoder"] == "hf"
    finally:
        asyncio.run(slow.close())
        asyncio.run(fast.close())


def test_device_loop_on_cpu_draws_the_host_loops_samples():
    """`device_loop: true` takes `_sample_chunk_device` (CUDA's default) on CPU: the same uniforms u[i, t] and
    inverse-CDF rule, one row per sample, EOS applied at the end - so the same samples as the host loop."""
    path = str(tiny_model_dir("qwen2", seed=3))
    host = TransformersEngine(ModelSpec(model=path, device="cpu"))
    dev = TransformersEngine(ModelSpec(model=path, device="cpu", decoding={"device_loop": True}))
    calls = []
    orig = dev._sample_chunk_device
    dev._sample_chunk_device = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        p = SamplingParams(n=12, temperature=1.0, max_tokens=10, seed=5)
        a = asyncio.run(host.chat(ChatRequest(messages=MSGS, params=p))).choices
        b = asyncio.run(dev.chat(ChatRequest(messages=MSGS, params=p))).choices
        assert calls and not host.device_loop
        assert [(c.text, c.finish_reason, c.num_tokens) for c in a] == [(c.text, c.finish_reason, c.num_tokens)
                                                                          for c in b]
        assert len({c.text for c in a}) > 1
    finally:
        asyncio.run(host.close())
        asyncio.run(dev.close())


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tomtransfer.services.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("student, message", [
    ("{model: b, decoding: {span_buckets: 8}}", "models.student.decoding.span_buckets"),
    ("{model: b, decoding: {prompt_bucket: 0}}", "models.student.decoding.prompt_bucket"),
    ("{model: b, decoding: {kv_budget_mb: 0}}", "models.student.decoding.kv_budget_mb"),
    ("{model: b, compile: true}", "models.student.compile"),  # moved into decoding
])
def test_bad_knob_is_a_config_error(tmp_path, student, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"models: {{teacher: {{model: a}}, student: {student}}}\n")
    r = cli("config", "validate", bad)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_max_adapters_bounds_the_loaded_adapters(tmp_path):
    """`serving.max_adapters` reaches the replica (build_app binds it): at most that many stay loaded, least
    recently used out."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tomtransfer.services.teacher.app import ModelServer

    path = str(tiny_model_dir("llama", seed=3))
    folders = []
    for i in range(3):
        torch.manual_seed(i)
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                              LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        peft.save_pretrained(str(tmp_path / f"a{i}"))
        folders.append(str(tmp_path / f"a{i}"))
    assert parse_config({"models": {"teacher": {"model": "a"}, "student": {"model": "b"}}}).serving.max_adapters == 16
    server = ModelServer.func_or_class("student", ModelSpec(model=path, device="cpu").model_dump(mode="json"),
                                       max_adapters=2)

    async def load_all():
        for i in (0, 1, 0, 2):  # a0 used again, so a1 is the least recently used when a2 arrives
            assert await server.load_adapter(f"a{i}", folders[i]) == {"ok": True}

    try:
        asyncio.run(load_all())
        assert server.engine.models() == ["a0", "a2"] and list(server.sources) == ["a0", "a2"]
    finally:
        asyncio.run(server.engine.close())


def test_openai_engine_knobs_are_configuration():
    """The remote engine's request split and timeout come from the model spec, not the environment (nothing is
    sent: the client connects on the first request only)."""
    from tomtransfer.services.teacher.engines.openai_engine import OpenAIEngine

    spec = ModelSpec(model="m", engine="openai", base_url="http://127.0.0.1:9/v1", remote_max_n=3,
                     remote_timeout_s=5)
    e = OpenAIEngine(spec)
    default = OpenAIEngine(ModelSpec(model="m", engine="openai", base_url="http://127.0.0.1:9/v1"))
    try:
        assert (e.max_n, e.client.timeout) == (3, 5)
        assert (default.max_n, default.client.timeout) == (128, 600)
    finally:
        asyncio.run(e.close())
        asyncio.run(default.close())
