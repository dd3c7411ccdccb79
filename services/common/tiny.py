"""Tiny random-weight models of real architectures, for fast tests and speed work.

`tiny_model_dir(arch, tokenizer)` returns a cached HF folder (config + safetensors + tokenizer with a
ChatML chat template) that loads with `AutoModelForCausalLM` / `AutoTokenizer` exactly like a real model,
so every engine code path (chat template, KV cache, peft LoRA, exact mode) runs in milliseconds.

- `arch`: "llama" (LlamaForCausalLM, the SmolLM2 / Llama-2 family) or "qwen2" (Qwen2ForCausalLM, with
  q/k/v biases, the Qwen2.5 family); grouped-query attention (4 heads, 2 KV heads) by default.
- `tokenizer`: "trained" (default: a ~600-token byte-level BPE trained on the scenario texts, so it needs
  nothing fetched), or a model alias / HF folder whose tokenizer is borrowed (a real 49k/151k vocab).

Weights are `torch.manual_seed(seed)` random with `initializer_range=0.1` (wider than the usual 0.02), so
next-token distributions are peaked enough for probability tests to be informative.

`llama2_7b_config()` is the Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000),
for GPU benchmarks with random weights built on the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from shared.prompts import build_messages
    from shared.scenarios import default_catalog

    texts = []
    for s in default_catalog().scenarios.values():
        for instr in ("answer_only", "answer_motivation"):
            texts += [m["content"] for m in build_messages(s, instr)]  # type: ignore[arg-type]
    texts += ["C", "D", " C", " D", "**C**", "**D**", "C.", "D.", "Answer: C", "Answer: D", "I choose C because",
              "I choose D because", "0 1 2 3 4 5 6 7 8 9 10", "I contribute $5 to the fund."] * 20
    return texts


def train_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer trained on the scenario texts, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _borrow_tokenizer(source: str):
    from transformers import AutoTokenizer

    from services.common.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(source)))


def tiny_config(arch: str, vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, max_positions: int = 4096, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                  max_position_embeddings=max_positions, initializer_range=0.1, tie_word_embeddings=False)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny arch {arch!r}; expected 'llama' or 'qwen2'")


def llama2_7b_config(vocab_size: int = 32000, max_positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=max_positions,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_tiny_model(out_dir: str | os.PathLike, *, arch: str = "llama", tokenizer: str = "trained", seed: int = 0,
                     **config_kwargs) -> Path:
    """Write a tiny random model + tokenizer to out_dir (atomically: temp dir, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    tok = train_tokenizer() if tokenizer == "trained" else _borrow_tokenizer(tokenizer)
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    cfg = tiny_config(arch, len(tok), **config_kwargs)
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    cfg.eos_token_id = eos
    cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=cfg.pad_token_id)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "tomtransfer-tiny.json").write_text(json.dumps({"arch": arch, "tokenizer": tokenizer, "seed": seed,
                                                                **config_kwargs}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_model_dir(arch: str = "llama", tokenizer: str = "trained", seed: int = 0, **config_kwargs) -> Path:
    """A cached tiny model folder (built on first use under <cache>/tiny/)."""
    from filelock import FileLock

    from services.common.models import cache_root

    key = json.dumps({"arch": arch, "tokenizer": tokenizer, "seed": seed, **config_kwargs, "v": 1}, sort_keys=True)
    name = f"{arch}-{tokenizer.replace('/', '_')}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    out = cache_root() / "tiny" / name
    if (out / "tomtransfer-tiny.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f"{name}.lock")):
        if not (out / "tomtransfer-tiny.json").is_file():
            build_tiny_model(out, arch=arch, tokenizer=tokenizer, seed=seed, **config_kwargs)
    return out
