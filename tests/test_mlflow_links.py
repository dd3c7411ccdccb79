"""The MLflow addresses a command prints work after it ends: with a local MLflow server (no `mlflow.tracking_uri`),
whose port dies with the command, MLflow's own "View run ... at http://127.0.0.1:<port>" lines are suppressed and
each run the command made is printed at the address `make mlflow-ui` serves (http://127.0.0.1:5000), with the
`make mlflow-ui` line that opens its store.

Uses the session's MLflow server: runs inside a private network namespace (`make test` does).
"""

from __future__ import annotations

import contextlib
import os
import time

from mlflow.tracking import MlflowClient

from tomtransfer.services.pipeline import resources
from tomtransfer.shared.config import parse_config

pytest_plugins = ["tests.fixtures.mlflow_server"]
QUIET = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def _cfg(tmp_path, **mlflow_cfg):
    return parse_config({"name": "links", "output_dir": str(tmp_path), "mlflow": mlflow_cfg,
                         "models": {"teacher": {"model": "t"}, "student": {"model": "s"}}})


def test_the_runs_of_a_local_server_are_listed_under_make_mlflow_ui(mlflow_tracking_uri, tmp_path, capsys):
    client = MlflowClient(mlflow_tracking_uri)
    exp = client.create_experiment(f"links-{time.time_ns()}")
    client.create_run(exp, run_name="earlier")  # before the command: not listed
    time.sleep(0.01)
    since = int(time.time() * 1000)
    made = [client.create_run(exp, run_name=name).info.run_id for name in ("demo", "demo-generate")]
    resources._say_ui_links(mlflow_tracking_uri, tmp_path / "mlflow", since)
    err = capsys.readouterr().err
    assert f"make mlflow-ui MLFLOW_STORE={tmp_path / 'mlflow'}, then" in err
    for name, run_id in zip(("demo", "demo-generate"), made):
        assert f"run {name}: http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}" in err
    assert "earlier" not in err and f"experiments/{exp}/runs?workflowType=machine_learning" in err
    assert mlflow_tracking_uri not in err  # the server's own (ephemeral) address is never printed
    # the demo's store (runs/mlflow) is what plain `make mlflow-ui` opens
    resources._say_ui_links(mlflow_tracking_uri, resources.UI_STORE, since)
    assert "open its runs after it: make mlflow-ui, then" in capsys.readouterr().err


def test_mlflows_own_links_are_off_only_while_a_local_server_runs(monkeypatch, tmp_path):
    listed = []

    @contextlib.contextmanager
    def server(root):
        yield type("S", (), {"uri": "http://127.0.0.1:45678"})()

    monkeypatch.setattr(resources, "MlflowServer", server)
    monkeypatch.setattr(resources, "_say_ui_links", lambda uri, root, since: listed.append((uri, root)))
    monkeypatch.delenv(QUIET, raising=False)
    with resources.tracking(_cfg(tmp_path)) as uri:
        assert os.environ[QUIET] == "true" and uri == "http://127.0.0.1:45678"
        assert resources.ui_address(_cfg(tmp_path), uri + "/#/experiments/3/runs?x=1", uri) == \
            "http://127.0.0.1:5000/#/experiments/3/runs?x=1  (make mlflow-ui)"
    assert QUIET not in os.environ and listed == [("http://127.0.0.1:45678", tmp_path / "mlflow")]
    # a configured server outlives the command: its links are left alone, nothing is listed
    with resources.tracking(_cfg(tmp_path, tracking_uri="http://mlflow.example:5000")) as uri:
        assert QUIET not in os.environ
        cfg = _cfg(tmp_path, tracking_uri=uri)
        assert resources.ui_address(cfg, uri + "/#/x", uri) == uri + "/#/x"
    assert len(listed) == 1
