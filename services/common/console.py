"""The one way the services print progress and notes: one line on stderr, flushed (stdout stays for results a
command prints, e.g. the URL `tomtransfer serve` prints, and for JSON)."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
