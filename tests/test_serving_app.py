"""The serving app for real: `tomtransfer serve --config CONFIG` (Ray Serve, in this session's private
network namespace), queried over HTTP with the `openai` client and httpx.

teacher = SmolLM2-135M-Instruct (real pretrained weights), student = a tiny random llama with a LoRA adapter from
the config; a second adapter is added over HTTP from a local folder (under serving.adapter_root) and a third from
an MLflow run (a real `mlflow server`). Bearer auth is on. Streaming (`stream: true`) is read with the openai
client. At the end the server gets SIGINT and must exit 0. The security limits: tests/test_serving_security.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from tomtransfer.services.common.models import is_fetched
from tests.fixtures.tiny_models import tiny_model_dir
from tomtransfer.services.teacher.exact import lead_choice
from tests.fixtures.netns_guard import require_private_netns
from tests.fixtures.serve_process import start_serve, wait_for_url

pytestmark = [pytest.mark.netns, pytest.mark.slow]
pytest_plugins = ["tests.fixtures.mlflow_server"]

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "smollm2-135m-instruct"
TOKEN_ENV = "TT_SERVING_TEST_TOKEN"
TOKEN = "s3cret-test-token"
MSG = [{"role": "system", "content": "Answer with one letter, C or D."}, {"role": "user", "content": "C or D?"}]


def make_lora(model_path: str, out: Path, seed: int, scale: float = 3.0) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.mul_(scale)
    peft.save_pretrained(str(out))
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, student: str, tmp: Path):
        self.url, self.proc, self.log, self.student, self.tmp = url, proc, log, student, tmp
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
        self.client = openai.OpenAI(base_url=url, api_key=TOKEN, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def app(tmp_path_factory, mlflow_tracking_uri, real_models):
    require_private_netns()
    if not is_fetched(TEACHER):
        pytest.skip(f"{TEACHER} is not fetched (make models)")
    tmp = tmp_path_factory.mktemp("serving")
    student = str(tiny_model_dir("llama", seed=3))
    cfg = {
        "name": "serving-test",
        "models": {
            "teacher": {"model": TEACHER, "num_cpus": 1, "max_batch_size": 2048, "device": "cpu"},
            "student": {"model": student, "num_cpus": 0.5, "device": "cpu"},
        },
        "sampling": {"temperature": 0.8, "max_tokens": 16},
        "serving": {"port": free_port(), "max_n": 2000, "max_tokens_cap": 64, "auth_token_env": TOKEN_ENV,
                    "adapter_root": str(tmp), "adapters": {"cfg": make_lora(student, tmp / "lora-cfg", seed=1)}},
        "mlflow": {"tracking_uri": mlflow_tracking_uri},
    }
    # the product's own spin count is checked here, not the one tests/conftest.py sets for the session
    proc, log = start_serve(cfg, tmp, {TOKEN_ENV: TOKEN}, drop=("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"))
    a = App(wait_for_url(proc, log), proc, log, student, tmp)
    yield a
    try:  # normally test_zz_sigint_stops_cleanly has stopped it; take down anything left in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


# --------------------------------------------------------------------------------------------- basics
def test_binds_loopback_and_lists_models(app):
    assert app.url.startswith("http://127.0.0.1:") and app.url.endswith("/v1")
    ids = [m.id for m in app.client.models.list().data]
    assert ids == ["teacher", "student", "student:cfg"]


def _descends_from(pid: int, root: int) -> bool:
    """Whether process `pid` has `root` among its ancestors (the serve process starts Ray; Ray starts the replicas)."""
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid == root:
            return True
    return False


def test_replicas_spin_briefly_and_the_ingress_is_untouched(app):
    """The engine replicas' processes start with GOMP_SPINCOUNT=10000 (app.replica_actor_options: an OpenMP thread
    spinning on at nice 15 beside a busy neighbour cost fp32 sampling 15x); the environment of the ingress, which
    runs no kernels, is left as it was. Only this app's replicas: the other xdist worker may serve an app of its own,
    built in the session's environment."""
    envs = {}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "ServeReplica:" in cmd and "tomtransfer-" in cmd and _descends_from(int(proc.name), app.proc.pid):
                role = cmd.split("tomtransfer-", 1)[1].split()[0]
                env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode().split("\0") if "=" in kv)
                envs[role] = env.get("GOMP_SPINCOUNT")
        except (OSError, IndexError, ValueError):
            continue
    assert envs.get("teacher") == envs.get("student") == "10000", envs
    assert envs.get("ingress") is None, envs


def test_auth_is_required(app):
    r = httpx.get(app.url + "/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(app.url + "/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app.url, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(app.url.rsplit("/v1", 1)[0] + "/health").status_code == 200


def test_chat_completions_with_the_openai_client(app):
    kw = dict(model="teacher", messages=MSG, n=4, temperature=0.8, max_tokens=8, seed=7)
    a = app.client.chat.completions.create(**kw)
    b = app.client.chat.completions.create(**kw)
    assert len(a.choices) == 4 and [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens > 0 and a.usage.prompt_tokens > 10
    # each choice's own token count (an extension; the teacher-cost metrics sum it)
    assert sum(c.model_extra["completion_tokens"] for c in a.choices) == a.usage.completion_tokens
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)
    lp = app.client.chat.completions.create(model="teacher", messages=MSG, n=2, max_tokens=4, seed=1, logprobs=True,
                                            top_logprobs=3, temperature=0.5)
    content = lp.choices[0].logprobs.content
    assert 1 <= len(content) <= 4 and len(content[0].top_logprobs) == 3 and content[0].logprob <= 0
    free = app.client.chat.completions.create(model="teacher", messages=MSG, n=8, max_tokens=12, seed=3)
    word = next(c.message.content.split()[1] for c in free.choices if len(c.message.content.split()) > 2)
    cut = app.client.chat.completions.create(model="teacher", messages=MSG, n=8, max_tokens=12, seed=3, stop=[word])
    for f, c in zip(free.choices, cut.choices):
        if word in f.message.content:
            assert word not in c.message.content and c.finish_reason == "stop"
            assert f.message.content.startswith(c.message.content)


def test_exact_matches_2000_samples_over_http(app):
    """Real model, real HTTP: exact P(C), P(D) vs 2000 samples that stop once the leading answer is decided."""
    body = {"model": "teacher", "scenario": "IR_prison", "instruction": "answer_only", "temperature": 0.8}
    x = app.http.post("/exact", json=body).json()
    assert x["object"] == "exact" and x["kind"] == "choice" and x["method"] == "tree"
    assert x["valid_mass"] + x["invalid_mass"] + x["unresolved_mass"] == pytest.approx(1, abs=1e-6)
    from tomtransfer.shared.prompts import build_messages
    from tomtransfer.shared.scenarios import default_catalog

    messages = build_messages(default_catalog().scenarios["IR_prison"], "answer_only")
    n = 2000
    r = app.client.chat.completions.create(model="teacher", messages=messages, n=n, temperature=0.8, max_tokens=16,
                                           seed=99, extra_body={"stop_at_answer": "choice"})
    counts = Counter(lead_choice(c.message.content) for c in r.choices)
    for a in ("C", "D"):
        p = x["p_" + a]
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(counts[a] / n - p) <= 3 * se + x["unresolved_mass"] + 1.0 / n, (a, counts[a] / n, p)
    assert abs(sum(v for k, v in counts.items() if k) / n - x["valid_mass"]) <= \
        3 * math.sqrt(max(x["valid_mass"] * (1 - x["valid_mass"]), 1e-12) / n) + x["unresolved_mass"] + 1.0 / n
    pgg = app.http.post("/exact", json={"model": "teacher", "scenario": "pgg"}).json()
    assert pgg["kind"] == "contribution" and set(pgg["contributions"]) == {str(i) for i in range(11)}


def test_adapters_over_http(app):
    base = app.http.post("/exact", json={"model": "student", "messages": MSG, "temperature": 1.0}).json()
    cfg = app.http.post("/exact", json={"model": "student:cfg", "messages": MSG, "temperature": 1.0}).json()
    assert cfg["top_tokens"] != base["top_tokens"]
    hot = make_lora(app.student, app.tmp / "lora-hot", seed=2)
    r = app.http.post("/adapters", json={"name": "hot", "source": hot})
    assert r.status_code == 200, r.text
    assert "student:hot" in [m.id for m in app.client.models.list().data]
    with_hot = app.http.post("/exact", json={"model": "student:hot", "messages": MSG, "temperature": 1.0}).json()
    assert with_hot["top_tokens"] != base["top_tokens"] and with_hot["top_tokens"] != cfg["top_tokens"]
    s = app.client.chat.completions.create(model="student:hot", messages=MSG, n=3, max_tokens=4, seed=1)
    assert len(s.choices) == 3
    # same name, other source: 409 unless replace
    assert app.http.post("/adapters", json={"name": "hot", "source": str(app.tmp / "lora-cfg")}).status_code == 409
    assert app.http.delete("/adapters/hot").status_code == 200
    gone = app.http.post("/exact", json={"model": "student:hot", "messages": MSG})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
    again = app.http.post("/exact", json={"model": "student", "messages": MSG, "temperature": 1.0}).json()
    assert again["p"] == pytest.approx(base["p"], abs=1e-9) and again["top_tokens"] == base["top_tokens"]
    assert app.http.delete("/adapters/hot").status_code == 404


def test_adapter_from_mlflow(app, mlflow_tracking_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_tracking_uri)
    exp = client.create_experiment(f"serving-test-{time.time_ns()}")
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, make_lora(app.student, app.tmp / "lora-ml", seed=4), "adapter")
    client.set_terminated(run.info.run_id)
    base = app.http.post("/exact", json={"model": "student", "messages": MSG, "temperature": 1.0}).json()
    for name, source in (("ml", f"runs:/{run.info.run_id}/adapter"),
                         ("ml2", client.get_run(run.info.run_id).info.artifact_uri + "/adapter")):
        r = app.http.post("/adapters", json={"name": name, "source": source})
        assert r.status_code == 200, r.text
        got = app.http.post("/exact", json={"model": f"student:{name}", "messages": MSG, "temperature": 1.0}).json()
        assert got["top_tokens"] != base["top_tokens"]
    # the artifact URI with the tracking server's host:port spelt out is the same server
    artifacts = client.get_run(run.info.run_id).info.artifact_uri + "/adapter"
    assert artifacts.startswith("mlflow-artifacts:/") and not artifacts.startswith("mlflow-artifacts://")
    hosted = "mlflow-artifacts://" + mlflow_tracking_uri.split("://", 1)[1].rstrip("/") + artifacts[len("mlflow-artifacts:"):]
    r = app.http.post("/adapters", json={"name": "ml3", "source": hosted})
    assert r.status_code == 200, r.text
    one = app.http.post("/exact", json={"model": "student:ml", "messages": MSG}).json()
    two = app.http.post("/exact", json={"model": "student:ml2", "messages": MSG}).json()
    three = app.http.post("/exact", json={"model": "student:ml3", "messages": MSG}).json()
    assert one["p"] == pytest.approx(two["p"], abs=1e-9)  # the same weights through every URI kind
    assert one["p"] == pytest.approx(three["p"], abs=1e-9)
    bad = app.http.post("/adapters", json={"name": "nope", "source": "runs:/0123456789abcdef/adapter"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "adapter_source_refused"


# --------------------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("method,path,body,status,param", [
    ("post", "/chat/completions", {"model": "nope", "messages": MSG}, 404, "model"),
    ("post", "/chat/completions", {"model": "student:nope", "messages": MSG}, 404, "model"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "n": 2001}, 400, "n"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "max_tokens": 65}, 400, "max_tokens"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "n": 0}, 400, "n"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "temperature": -1}, 400, "temperature"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "top_logprobs": 50, "logprobs": True}, 400,
     "top_logprobs"),
    ("post", "/chat/completions", {"model": "teacher"}, 400, "messages"),
    ("post", "/chat/completions", {"model": "teacher", "messages": []}, 400, "messages"),
    ("post", "/chat/completions", {"model": "teacher", "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "stream": True,
                                   "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "tools": []}, 400, "tools"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "n": "many"}, 400, "n"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "guided_choice": ["C", "D"]}, 400, "guided_choice"),
    ("post", "/chat/completions", {"model": "teacher", "messages": MSG, "structured_outputs": {"regex": "C"}}, 400,
     "structured_outputs"),
    ("post", "/chat/completions", "{not json", 400, None),
    ("post", "/chat/completions", [1, 2], 400, None),
    ("post", "/exact", {"model": "teacher", "scenario": "nope"}, 404, "scenario"),
    ("post", "/exact", {"model": "teacher"}, 400, "messages"),
    ("post", "/exact", {"model": "teacher", "scenario": "pgg", "kind": "vote"}, 400, "kind"),
    ("post", "/adapters", {"name": "bad name!", "source": "/tmp"}, 400, "name"),
    ("post", "/adapters", {"name": "x", "source": "/does/not/exist"}, 400, "source"),
    ("post", "/adapters", {"name": "x", "source": "s3://bucket/a"}, 400, "source"),
    ("delete", "/adapters/unknown", None, 404, "name"),
    ("get", "/nowhere", None, 404, None),
])
def test_bad_requests_get_openai_style_4xx(app, method, path, body, status, param):
    if isinstance(body, str):
        r = app.http.request(method.upper(), path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = app.http.request(method.upper(), path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] and err["param"].startswith(param)


# ---------------------------------------------------------------------------------------------- streaming
def _read_stream(stream, n: int):
    texts, finish, roles = [""] * n, [None] * n, [None] * n
    chunks = list(stream)
    for ch in chunks:
        assert ch.object == "chat.completion.chunk" and isinstance(ch.system_fingerprint, str)
        for c in ch.choices:
            assert finish[c.index] is None  # nothing after a choice's final chunk
            roles[c.index] = c.delta.role or roles[c.index]
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason
    assert len({ch.id for ch in chunks}) == 1
    return chunks, texts, finish, roles


@pytest.mark.parametrize("n", [1, 2])
def test_streaming_with_the_openai_client(app, n):
    kw = dict(model="teacher", messages=MSG, n=n, temperature=0.8, max_tokens=12, seed=11)
    whole = app.client.chat.completions.create(**kw)
    assert isinstance(whole.system_fingerprint, str) and whole.system_fingerprint
    chunks, texts, finish, roles = _read_stream(app.client.chat.completions.create(**kw, stream=True), n)
    assert roles == ["assistant"] * n
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    words = sum(len(t.split()) for t in texts)
    assert len(chunks) >= 2 * n + min(words, 2)  # a role chunk and a final chunk per choice, content between
    # include_usage: one more chunk, no choices, the usage of the whole request
    chunks, texts2, _, _ = _read_stream(app.client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}), n)
    assert texts2 == texts and chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens and all(c.usage is None for c in chunks[:-1])
    # the student, through an adapter, with logprobs: one token per chunk, the same logprobs
    kw = dict(model="student:cfg", messages=MSG, n=n, max_tokens=6, seed=5, logprobs=True, top_logprobs=2)
    whole = app.client.chat.completions.create(**kw)
    chunks, texts, _, _ = _read_stream(app.client.chat.completions.create(**kw, stream=True), n)
    assert texts == [c.message.content for c in whole.choices]
    for i, c in enumerate(whole.choices):
        got = [t for ch in chunks for x in ch.choices if x.index == i and x.logprobs for t in x.logprobs.content]
        assert [(t.token, t.logprob) for t in got] == [(t.token, t.logprob) for t in c.logprobs.content]


def test_streaming_wire_format(app):
    body = {"model": "teacher", "messages": MSG, "n": 2, "max_tokens": 4, "seed": 2, "stream": True}
    with app.http.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and isinstance(c["system_fingerprint"], str) for c in chunks)
    assert sorted(c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]) == \
        sorted(c["choices"][0]["finish_reason"] for c in chunks[-2:])
    # errors before the stream starts are plain JSON errors
    bad = app.http.post("/chat/completions", json={**body, "model": "nope"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"


def test_openai_client_sees_typed_errors(app):
    with pytest.raises(openai.NotFoundError):
        app.client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.BadRequestError):
        app.client.chat.completions.create(model="teacher", messages=MSG, n=5000)


# ------------------------------------------------------------------------------------ openai engine
def test_openai_engine_against_the_app(app, monkeypatch):
    """The remote-teacher engine, pointed at this app's teacher: chat, seeds, answer cut, approximate exact."""
    import asyncio

    from tomtransfer.services.teacher.engines.base import ChatRequest, EngineInputError, ExactRequest, SamplingParams
    from tomtransfer.services.teacher.engines.openai_engine import OpenAIEngine, UpstreamError
    from tomtransfer.shared.config import ModelSpec
    from tomtransfer.shared.errors import UserError

    monkeypatch.setenv("TT_REMOTE_KEY", TOKEN)
    spec = ModelSpec(model="remote", engine="openai", base_url=app.url, api_key_env="TT_REMOTE_KEY",
                     remote_model="teacher")

    async def go():
        e = OpenAIEngine(spec)
        try:
            p = SamplingParams(n=5, temperature=0.8, max_tokens=6, seed=3)
            a = await e.chat(ChatRequest(messages=tuple(MSG), params=p))
            direct = app.client.chat.completions.create(model="teacher", messages=MSG, n=5, temperature=0.8,
                                                        max_tokens=6, seed=3)
            assert [c.text for c in a.choices] == [c.message.content for c in direct.choices]
            x = await e.exact(ExactRequest(messages=tuple(MSG), temperature=0.8))
            assert x.approximate and x.method == "top_logprobs"
            assert x.valid_mass + x.invalid_mass + x.unresolved_mass == pytest.approx(1, abs=1e-6)
            with pytest.raises(EngineInputError):
                await e.chat(ChatRequest(messages=tuple(MSG), params=SamplingParams(n=1, max_tokens=1000)))
        finally:
            await e.close()
        bad = OpenAIEngine(spec.model_copy(update={"remote_model": "nope"}))
        with pytest.raises(UpstreamError):
            await bad.chat(ChatRequest(messages=tuple(MSG)))
        await bad.close()

    asyncio.run(go())
    monkeypatch.delenv("TT_REMOTE_KEY")
    with pytest.raises(UserError):
        OpenAIEngine(spec)


# ------------------------------------------------------------------------------------------- shutdown
def test_zz_sigint_stops_cleanly(app):
    app.proc.send_signal(signal.SIGINT)  # Ctrl-C to the serve process only
    assert app.proc.wait(90) == 0, app.log.read_text()[-3000:]
    assert "stopped" in app.log.read_text()
