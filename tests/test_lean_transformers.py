"""services/common/lean_transformers: a process that loads transformers through it (serving replicas, Ray Train
workers, the CLI's preflight) does not import scikit-learn, and still loads a model, samples and builds LoRA layers;
a plain `import transformers` does import it (if that stops, the module has nothing left to do)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.fixtures.tiny_models import tiny_model_dir

LEAN = """
import asyncio, json, sys
from tomtransfer.services.common import lean_transformers
from tomtransfer.services.teacher.engines.base import ChatRequest, SamplingParams
from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine
from tomtransfer.shared.config import ModelSpec

transformers = lean_transformers.load()
eng = TransformersEngine(ModelSpec(model=sys.argv[1], device="cpu"))
msgs = ({"role": "user", "content": "C or D?"},)
out = asyncio.run(eng.chat(ChatRequest(messages=msgs, params=SamplingParams(n=3, max_tokens=6, seed=1))))
from peft import LoraConfig, get_peft_model  # the training loop's imports, after transformers
model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]),
                       LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
print(json.dumps({"sklearn": "sklearn" in sys.modules, "samples": len(out.choices),
                  "lora": sum(p.requires_grad for p in model.parameters())}))
"""
PLAIN = "import sys, transformers; transformers.AutoTokenizer; print('sklearn' in sys.modules)"


def _run(code: str, *args: str) -> str:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1]


def test_a_model_loads_samples_and_trains_without_sklearn():
    got = json.loads(_run(LEAN, str(tiny_model_dir("llama", seed=3))))
    assert got == {"sklearn": False, "samples": 3, "lora": got["lora"]} and got["lora"] > 0


def test_plain_transformers_imports_sklearn():
    assert _run(PLAIN) == "True"
