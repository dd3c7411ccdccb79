"""Serving security, for real: `tomtransfer serve --config CONFIG` (Ray Serve, tiny random models, in this
session's private network namespace), queried over HTTP.

- Adapter sources of `POST /v1/adapters`: folders under `serving.adapter_root` (after symlinks) and MLflow URIs of
  the configured tracking server only (a real `mlflow server`); every refused or missing source gets the very same
  answer; a foreign `mlflow-artifacts://` host (a local socket that records connects) is never contacted.
- Caps: the body (413), messages, message characters, stop strings, guided choices (400 naming the param).
- Auth: every /v1 route with no token and a wrong token (401), and with the right one.
- `tomtransfer serve` refuses an open non-loopback bind (no server needed for that).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.netns_guard import require_private_netns
from tests.fixtures.serve_process import start_serve, wait_for_url

pytest_plugins = ["tests.fixtures.mlflow_server"]

ROOT = Path(__file__).resolve().parents[1]
TOKEN_ENV = "TT_SECURITY_TEST_TOKEN"
TOKEN = "s3cret-security-token"
MSG = [{"role": "system", "content": "Answer with one letter, C or D."}, {"role": "user", "content": "C or D?"}]
CAPS = {"max_body_bytes": 16384, "max_messages": 8, "max_message_chars": 4000, "max_stop_strings": 4,
        "max_guided_choices": 4}


def make_lora(model_path: str, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(str(out))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConnectRecorder:
    """A listening socket on 127.0.0.1 that counts the connections made to it (the 'foreign host')."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connects += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class App:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, student: str, tmp: Path, root: Path,
                 outside: Path, good: Path, tracking: str):
        self.url, self.proc, self.log, self.student, self.tmp = url, proc, log, student, tmp
        self.root, self.outside, self.good, self.tracking = root, outside, good, tracking
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)


@pytest.fixture(scope="module")
def app(tmp_path_factory, mlflow_tracking_uri):
    from tests.fixtures.tiny_models import tiny_model_dir

    require_private_netns()
    tmp = tmp_path_factory.mktemp("security")
    teacher, student = str(tiny_model_dir("llama", seed=0)), str(tiny_model_dir("llama", seed=1))
    root, outside = tmp / "root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    cfg = {
        "name": "security-test",
        "output_dir": str(tmp / "runs"),
        "models": {"teacher": {"model": teacher, "num_cpus": 0.5, "device": "cpu"},
                   "student": {"model": student, "num_cpus": 0.5, "device": "cpu"}},
        "sampling": {"temperature": 0.8, "max_tokens": 8},
        "serving": {"port": free_port(), "max_tokens_cap": 32, "auth_token_env": TOKEN_ENV,
                    "adapter_root": str(root), **CAPS},
        "mlflow": {"tracking_uri": mlflow_tracking_uri},
    }
    # the adapters exist before the app starts: nothing under adapter_root changes while it loads, and the
    # 2-core CI machine is not building them while Ray starts (a CI run saw the command exit during startup)
    good = make_lora(student, root / "good", seed=1)
    make_lora(student, outside / "lora", seed=2)
    proc, log = start_serve(cfg, tmp, {TOKEN_ENV: TOKEN})
    yield App(wait_for_url(proc, log), proc, log, student, tmp, root, outside, good, mlflow_tracking_uri)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def refused(r: httpx.Response) -> dict:
    """The one answer for a refused or missing adapter source."""
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"]["param"] == "source" and body["error"]["code"] == "adapter_source_refused", body
    assert "\n" not in body["error"]["message"]
    return body


# ------------------------------------------------------------------------------------------------ auth
def _routes() -> set[tuple[str, str]]:
    from tomtransfer.services.teacher.app import api

    return {(method.upper(), path) for path, ops in api.openapi()["paths"].items() if path.startswith("/v1")
            for method in ops}


# (method, path, body, status with the right token)
AUTH_CASES = [
    ("GET", "/v1/models", None, 200),
    ("POST", "/v1/chat/completions", {"model": "teacher", "messages": MSG, "max_tokens": 2, "seed": 1}, 200),
    ("POST", "/v1/chat/completions", {"model": "teacher", "messages": MSG, "max_tokens": 2, "stream": True}, 200),
    ("POST", "/v1/exact", {"model": "student", "messages": MSG}, 200),
    ("GET", "/v1/adapters", None, 200),
    ("POST", "/v1/adapters", {"name": "auth", "source": "good", "replace": True}, 200),
    ("DELETE", "/v1/adapters/{name}", None, 404),
]


def test_the_auth_cases_cover_every_v1_route():
    assert {(m, p) for m, p, _, _ in AUTH_CASES} == _routes()


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("method,path,body,status", AUTH_CASES, ids=[f"{m} {p}" for m, p, _, _ in AUTH_CASES])
def test_every_v1_route_needs_the_token(app, method, path, body, status):
    url = app.url.rsplit("/v1", 1)[0] + path.replace("{name}", "not-there")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        r = httpx.request(method, url, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (headers, r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    r = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
    assert r.status_code == status, r.text


@pytest.mark.netns
@pytest.mark.slow
def test_auth_comes_before_the_body(app):
    url = app.url + "/chat/completions"
    r = httpx.post(url, content=b"x" * (CAPS["max_body_bytes"] + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 401  # not 413: nothing about the request is judged before the token
    r = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    assert httpx.get(app.url.rsplit("/v1", 1)[0] + "/health").status_code == 200  # open


# ---------------------------------------------------------------------------------------------- adapters
@pytest.mark.netns
@pytest.mark.slow
def test_adapters_under_the_root_load(app):
    (app.root / "alias").symlink_to(app.good, target_is_directory=True)  # a symlink that stays inside
    for name, source in (("abs", str(app.good)), ("rel", "good"), ("alias", "alias"), ("parent", str(app.root))):
        r = app.http.post("/adapters", json={"name": name, "source": source})
        assert r.status_code == 200, r.text
        assert Path(r.json()["source"]).is_absolute()
    ids = [m["id"] for m in app.http.get("/models").json()["data"]]
    assert {"student:abs", "student:rel", "student:alias", "student:parent"} <= set(ids)
    a = app.http.post("/exact", json={"model": "student:abs", "messages": MSG}).json()
    b = app.http.post("/exact", json={"model": "student:alias", "messages": MSG}).json()
    base = app.http.post("/exact", json={"model": "student", "messages": MSG}).json()
    assert a["p"] == pytest.approx(b["p"], abs=1e-9) and a["top_tokens"] != base["top_tokens"]
    chat = app.http.post("/chat/completions", json={"model": "student:rel", "messages": MSG, "max_tokens": 3})
    assert chat.status_code == 200, chat.text


@pytest.mark.netns
@pytest.mark.slow
def test_refused_and_missing_sources_get_one_answer(app):
    root, outside = app.root, app.outside
    (root / "escape").symlink_to(outside / "lora", target_is_directory=True)  # a symlinked folder leaving the root
    half = root / "half"  # the config inside, the weights a symlink to outside
    half.mkdir()
    shutil.copy(outside / "lora" / "adapter_config.json", half / "adapter_config.json")
    for f in (outside / "lora").iterdir():
        if f.name != "adapter_config.json":
            (half / f.name).symlink_to(f)
    (root / "chain").symlink_to(root / "escape")  # a symlink to a symlink that leaves
    (root / "empty").mkdir()
    (root / "file").write_text("not an adapter")
    sources = [
        str(outside / "lora"),  # an adapter outside the root
        str(root / "escape"), "escape", str(root / "half"), str(root / "chain"),
        str(root / ".." / "outside" / "lora"), "../outside/lora",  # dot-dot out of the root
        str(root / "missing"), "missing",  # nonexistent inside
        str(outside / "missing"), "/nonexistent/adapter",  # nonexistent outside
        str(root / "empty"), str(root / "file"), "/", "/etc", "~", "/proc/self",
        f"file://{outside / 'lora'}", "s3://bucket/adapter", f"http://127.0.0.1:{free_port()}/adapter",
        "runs://profile@databricks/0123/adapter", "models://x@databricks/m/1", "mlflow-artifacts:/../../etc",
    ]
    answers = []
    for source in sources:
        r = app.http.post("/adapters", json={"name": "bad", "source": source})
        answers.append((r.status_code, r.content))
        refused(r)
    assert len(set(answers)) == 1, {s: a for s, a in zip(sources, answers)}
    assert "student:bad" not in [m["id"] for m in app.http.get("/models").json()["data"]]
    # what the answer does not tell: the server's paths
    assert str(root) not in answers[0][1].decode() and "exist" not in answers[0][1].decode()


@pytest.mark.netns
@pytest.mark.slow
def test_a_registered_name_is_not_taken_over_by_a_refused_source(app):
    assert app.http.post("/adapters", json={"name": "keep", "source": str(app.good)}).status_code == 200
    refused(app.http.post("/adapters", json={"name": "keep", "source": str(app.outside / "lora"), "replace": True}))
    got = app.http.get("/adapters").json()["data"]
    assert next(a for a in got if a["name"] == "keep")["source"] == os.path.normpath(app.good)
    assert app.http.post("/exact", json={"model": "student:keep", "messages": MSG}).status_code == 200


@pytest.mark.netns
@pytest.mark.slow
def test_mlflow_sources_stay_on_the_tracking_server(app):
    """A foreign mlflow-artifacts host, and runs whose artifact location is a foreign host, are refused without a
    single connection to that host; runs:/ of the tracking server loads; a missing run gets the same answer."""
    from mlflow.tracking import MlflowClient

    rec = ConnectRecorder()
    try:
        client = MlflowClient(app.tracking)
        good_exp = client.create_experiment(f"security-good-{time.time_ns()}")
        run = client.create_run(good_exp).info.run_id
        client.log_artifacts(run, str(app.good), "adapter")
        r = app.http.post("/adapters", json={"name": "ml", "source": f"runs:/{run}/adapter"})
        assert r.status_code == 200, r.text

        from mlflow.exceptions import MlflowException

        foreign_runs = []  # runs whose artifacts would be on the foreign host (where the server lets one make them)
        for location in (f"mlflow-artifacts://127.0.0.1:{rec.port}/evil", f"http://127.0.0.1:{rec.port}/evil",
                         f"https://127.0.0.1:{rec.port}/evil", f"s3://127.0.0.1:{rec.port}/evil"):
            try:
                exp = client.create_experiment(f"security-evil-{time.time_ns()}", artifact_location=location)
            except MlflowException as e:
                print(f"the tracking server refuses artifact_location {location}: {str(e)[:120]}")
                continue
            foreign_runs.append(client.create_run(exp).info.run_id)
        assert foreign_runs
        sources = [
            f"mlflow-artifacts://127.0.0.1:{rec.port}/1/{run}/artifacts/adapter",
            f"mlflow-artifacts://127.0.0.1:{rec.port}",
            f"mlflow-artifacts://user:pw@127.0.0.1:{rec.port}/x",
            *(f"runs:/{r}/adapter" for r in foreign_runs),
            "runs:/0123456789abcdef0123456789abcdef/adapter",  # no such run
            "models:/no-such-model/1",
        ]
        answers = {s: refused(app.http.post("/adapters", json={"name": "evil", "source": s})) for s in sources}
        assert len({json.dumps(a, sort_keys=True) for a in answers.values()}) == 1
        time.sleep(1.0)
        assert rec.connects == 0, "a connection was made to the foreign host"
        with socket.create_connection(("127.0.0.1", rec.port), timeout=5):
            pass  # the recorder does record
        deadline = time.monotonic() + 5
        while rec.connects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.connects == 1
    finally:
        rec.close()


# ------------------------------------------------------------------------------------------------- caps
@pytest.mark.netns
@pytest.mark.slow
def test_a_body_over_the_cap_is_a_413(app):
    cap = CAPS["max_body_bytes"]
    big = {"model": "teacher", "messages": [{"role": "user", "content": "x" * cap}]}
    r = app.http.post("/chat/completions", json=big)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "request_too_large"
    assert "serving.max_body_bytes" in err["message"] and "\n" not in err["message"]

    def chunked():  # no Content-Length: cut off while reading
        yield b'{"model": "teacher", "messages": [{"role": "user", "content": "'
        for _ in range(cap // 1024 + 2):
            yield b"x" * 1024
        yield b'"}]}'

    r = app.http.post("/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for path in ("/exact", "/adapters"):
        r = app.http.post(path, json={"model": "student", "name": "x", "source": "y" * cap})
        assert r.status_code == 413, r.text
    import openai

    client = openai.OpenAI(base_url=app.url, api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="teacher", messages=big["messages"])
    assert e.value.status_code == 413


@pytest.mark.netns
@pytest.mark.slow
def test_a_body_nested_too_deep_is_a_400(app):
    deep = b'{"model": "teacher", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    r = app.http.post("/chat/completions", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("path,extra,param,field", [
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 9}, "messages", "max_messages"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 2001}] * 2}, "messages",
     "max_message_chars"),
    ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 4001}]}]},
     "messages", "max_message_chars"),
    ("/chat/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "max_stop_strings"),
    ("/chat/completions", {"guided_choice": ["A", "B", "C", "D", "E"]}, "guided_choice", "max_guided_choices"),
    ("/chat/completions", {"structured_outputs": {"choice": ["A", "B", "C", "D", "E"]}}, "structured_outputs",
     "max_guided_choices"),
    ("/exact", {"messages": [{"role": "user", "content": "x"}] * 9}, "messages", "max_messages"),
    ("/exact", {"messages": [{"role": "user", "content": "x" * 4001}]}, "messages", "max_message_chars"),
])
def test_caps_are_400s_naming_the_param(app, path, extra, param, field):
    r = app.http.post(path, json={"model": "teacher", "messages": MSG, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and f"serving.{field}" in err["message"] and "\n" not in err["message"]


@pytest.mark.netns
@pytest.mark.slow
def test_requests_at_the_caps_pass(app):
    msgs = [{"role": "system", "content": "s"}] + [{"role": "user", "content": "x" * 100}] * 7
    r = app.http.post("/chat/completions", json={"model": "teacher", "messages": msgs, "max_tokens": 2,
                                                 "stop": ["a", "b", "c", "d"]})
    assert r.status_code == 200, r.text
    r = app.http.post("/exact", json={"model": "teacher", "messages": [{"role": "user", "content": "C or D? " * 500}]})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------------- the bind
def _config(tmp_path: Path, **serving) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bind-test", "output_dir": str(tmp_path / "runs"),
        "models": {"teacher": {"model": str(tmp_path / "no-such-model")}, "student": {"model": "also-missing"}},
        "serving": serving}))
    return path


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_serve_refuses_an_open_non_loopback_bind(tmp_path, host):
    cfg = _config(tmp_path, host=host)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tomtransfer.services.cli", "serve", "--config", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_ADDRESS": "", "COLUMNS": "400"})
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert f"serving.host {host}" in lines[0] and "auth_token_env" in lines[0] and "allow_open" in lines[0]
    assert p.stdout == "" and not (tmp_path / "runs").exists()
    assert time.monotonic() - t0 < 60  # refused before the models (missing here) or Ray


def test_the_bind_check_allows_loopback_a_token_or_allow_open(monkeypatch, tmp_path):
    from tomtransfer.services.common.checks import check_bind
    from tomtransfer.shared.config import load_config
    from tomtransfer.shared.errors import UserError

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"):
        check_bind(load_config(_config(tmp_path, host=host)))
    check_bind(load_config(_config(tmp_path, host="0.0.0.0", auth_token_env="SOME_TOKEN")))
    check_bind(load_config(_config(tmp_path, host="0.0.0.0", allow_open=True)))
    with pytest.raises(UserError, match="not a loopback address"):
        check_bind(load_config(_config(tmp_path, host="0.0.0.0")))


# ------------------------------------------------------------------------------------- the policy, pure
@pytest.mark.parametrize("source,ok", [
    ("good", True), ("/r/good", True), ("/elsewhere", True),  # lexically fine; the replica resolves and checks
    ("runs:/0123abc/adapter", True), ("models:/m-0123", True), ("models:/tom/3/adapter", True),
    ("mlflow-artifacts:/1/2/artifacts/adapter", True), ("mlflow-artifacts://127.0.0.1:5000/1/x", True),
    ("mlflow-artifacts://127.0.0.1:5001/1/x", False), ("mlflow-artifacts://localhost:5000/1/x", False),
    ("mlflow-artifacts://u:p@127.0.0.1:5000/1/x", False), ("mlflow-artifacts://127.0.0.1:99999/x", False),
    ("runs://profile@databricks/0123/adapter", False), ("runs:/0123/../x", False), ("runs:/0123/%2e%2e/x", False),
    ("runs:/0123/adapter?x=1", False), ("runs:/0123/adapter#f", False), ("runs:/0123/ad apter", False),
    ("file:///etc", False), ("s3://b/a", False), ("http://127.0.0.1:5000/a", False), ("gs://b/a", False),
    ("", False), ("a\x00b", False), ("a\nb", False),
])
def test_policy_check_is_pure_and_strict(source, ok):
    from tomtransfer.services.teacher.app import AdapterPolicy, AdapterSourceError

    policy = AdapterPolicy("/r", "http://127.0.0.1:5000")
    if ok:
        policy.check(source)
    else:
        with pytest.raises(AdapterSourceError):
            policy.check(source)


@pytest.mark.parametrize("tracking,location,ok", [
    ("http://127.0.0.1:5000", "mlflow-artifacts:/1/r/artifacts", True),
    ("http://127.0.0.1:5000", "mlflow-artifacts://127.0.0.1:5000/1/r/artifacts", True),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1", True),
    ("http://127.0.0.1:5000", "mlflow-artifacts://127.0.0.1:6000/1/r/artifacts", False),
    ("http://127.0.0.1:5000", "https://127.0.0.1:5000/x", False),
    ("http://127.0.0.1:5000", "s3://bucket/x", False),
    ("http://127.0.0.1:5000", "/srv/mlflow/artifacts/1", False),
    ("http://mlflow:80", "mlflow-artifacts://mlflow/1", True),
    ("sqlite:///m.db", "/srv/mlflow/artifacts/1", True),
    ("sqlite:///m.db", "file:///srv/mlflow/artifacts/1", True),
    ("sqlite:///m.db", "mlflow-artifacts:/1", False),
    ("file:///mlruns", "s3://bucket/x", False),
])
def test_resolved_artifact_locations_must_be_the_tracking_servers(tracking, location, ok):
    from tomtransfer.services.teacher.app import AdapterPolicy, AdapterSourceError

    policy = AdapterPolicy(None, tracking)
    if ok:
        policy.check_location(location)
    else:
        with pytest.raises(AdapterSourceError):
            policy.check_location(location)
    with pytest.raises(AdapterSourceError):
        policy.check("/any/local/path")  # adapter_root false: local paths refused
