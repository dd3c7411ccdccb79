"""Private network namespaces for tests that start Ray or servers.

Ray binds every interface (it ignores `_node_ip_address`), and nothing our tests start may be reachable from,
or talk to, anything but loopback. The rule: such tests run in a network namespace where only `lo` is up.

How it is enforced (pick nothing; it is automatic):

- `tests/conftest.py` calls `maybe_reexec(config)` from `pytest_configure`: when the session is NOT already in
  a private namespace (`TOMTRANSFER_NETNS` != "1" and a non-loopback interface is up) and `unshare -n` works
  here (root, or unprivileged user namespaces), the whole pytest process re-executes itself, with the same
  arguments and working directory, through `scripts/in-netns` (`unshare -n` + `ip link set lo up`, sets
  `TOMTRANSFER_NETNS=1`). Client and servers then share the namespace, so `http://127.0.0.1:PORT` works
  between them and nothing else does. `make test` already runs pytest under `scripts/in-netns`; the re-exec
  makes a plain `.venv/bin/python -m pytest tests/...` safe too.
- Opt out with `TOMTRANSFER_NETNS=0` (e.g. when debugging unit tests); tests that start Ray/servers must then
  call `require_private_netns()` (tests.fixtures.netns_guard) or the `private_netns` fixture below, which fail
  with the command to use instead of starting anything.

Helpers: `in_private_netns()`, `netns_argv(argv)` (wrap any command), `run_in_netns(argv, **kw)`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IN_NETNS = ROOT / "scripts" / "in-netns"


def in_private_netns() -> bool:
    from tests.fixtures.netns_guard import interfaces_up

    return not interfaces_up()


def netns_argv(argv: list[str]) -> list[str]:
    """`argv` wrapped so that it runs in a fresh namespace with only loopback up."""
    if IN_NETNS.is_file():
        return [str(IN_NETNS), *argv]
    flags = "-n" if os.geteuid() == 0 else "-rn"
    return ["unshare", flags, "env", "TOMTRANSFER_NETNS=1", "sh", "-c", 'ip link set lo up && exec "$@"', "netns",
            *argv]


def can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    flags = "-n" if os.geteuid() == 0 else "-rn"
    try:
        return subprocess.run(["unshare", flags, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_in_netns(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(netns_argv(argv), **kwargs)


def maybe_reexec(config) -> None:
    """Re-execute this pytest session inside a private network namespace (see the module docstring)."""
    flag = os.environ.get("TOMTRANSFER_NETNS")
    if flag in ("1", "0"):
        return
    if in_private_netns() or not can_unshare():
        return
    args = [sys.executable, "-m", "pytest", *config.invocation_params.args]
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.stop_global_capturing()
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(config.invocation_params.dir)
    argv = netns_argv(args)
    os.execvp(argv[0], argv)


try:
    import pytest

    @pytest.fixture(scope="session")
    def private_netns() -> None:
        """Fail (with the command to use) unless this process is in a private network namespace."""
        from tests.fixtures.netns_guard import require_private_netns

        require_private_netns()
except ImportError:  # pragma: no cover - usable without pytest
    pass
