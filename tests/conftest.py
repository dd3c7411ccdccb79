"""Top-level pytest configuration.

Network isolation: the session re-executes itself inside a private network namespace (only loopback up)
unless it already is in one; see tests/netns.py. Set TOMTRANSFER_NETNS=0 to opt out (then tests that start
Ray or servers refuse to run).
"""

from __future__ import annotations


def pytest_configure(config):
    from tests.netns import maybe_reexec

    maybe_reexec(config)
