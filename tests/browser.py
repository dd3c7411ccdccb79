"""Headless Debian Chromium for tests that look at a page as a person would (no downloaded browser)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

# Flags that keep Chromium off the network except for the page asked for (this machine has none).
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=20000",
]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise RuntimeError("Debian chromium is not installed; `make install` installs it (root + apt)")
    return exe


def render(url: str, screenshot: Path | None = None, timeout: float = 120,
           size: tuple[int, int] = (1400, 900)) -> str:
    """The page's DOM after its scripts ran, in a fresh profile (nothing remembered from an earlier visit);
    optionally a PNG screenshot too. `size`: the window (wide tables render only the columns that fit)."""
    with tempfile.TemporaryDirectory() as profile:
        base = [chromium(), *FLAGS, f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=timeout).stdout
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=timeout)
    return dom
