"""A local MLflow tracking server: sqlite backend + artifact folder, bound to 127.0.0.1.

`tomtransfer run` starts one when the config names no tracking URI; the tests start one per session.
Artifacts are proxied by the server (`--artifacts-destination`), so runs record `mlflow-artifacts:/`
URIs that any client of the server can read, and `make mlflow-ui` reopens the same store later.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tomtransfer.shared.errors import UserError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    root: Path
    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    @property
    def artifacts(self) -> Path:
        return (self.root / "artifacts").resolve()

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        log = open(self.root / "server.log", "ab")
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts),
            "--host", self.host, "--port", str(self.port), "--workers", "1",
        ]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        # Own process group: stop() takes the gunicorn/uvicorn workers down with it.
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"mlflow server exited with code {self.process.returncode}; see {self.root / 'server.log'}")
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise UserError(f"mlflow server did not become healthy within {timeout:.0f} s; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
