"""Wall time and peak memory of a whole command *including every process it starts* (Ray's raylet,
workers and Serve replicas are descendants of the driver; `/usr/bin/time` sees only the driver).

Memory is sampled once a second over the process tree: the sum of PSS (proportional set size: shared
pages such as torch's libraries are split between the processes that map them, so the sum is the
tree's real footprint) and, for comparison, the sum of RSS (which counts shared pages once per process).

    python -m benchmarks.measure_run --out benchmarks/results/demo_run.json -- tomtransfer run --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil


def _label(p: psutil.Process) -> str:
    """A short name for a process: Ray sets the titles of its workers (e.g. `ray::ServeReplica:...`)."""
    try:
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not cmd:
        return p.name()
    first = cmd[0]
    if first.startswith("ray::"):
        return " ".join(cmd)[:80]
    tail = next((c for c in cmd[1:] if not c.startswith("-")), "")
    return f"{Path(first).name} {Path(tail).name if '/' in tail else tail}"[:80]


def tree_memory(root: psutil.Process) -> tuple[int, int, int, list[tuple[str, int]]]:
    pss = rss = n = 0
    parts: list[tuple[str, int]] = []
    for p in [root, *root.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        one = getattr(info, "pss", info.rss)
        pss += one
        rss += info.rss
        n += 1
        parts.append((_label(p), one))
    return pss, rss, n, parts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        ap.error("give the command after --")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak = {"pss": 0, "rss": 0, "processes": 0, "at_s": 0.0, "parts": []}
    timeline: list[tuple[float, float]] = []  # (seconds, PSS GiB) every ~10 s
    stop = threading.Event()

    def sample() -> None:
        last = -1e9
        while not stop.is_set():
            pss, rss, n, parts = tree_memory(root)
            now = time.perf_counter() - t0
            if pss > peak["pss"]:
                peak.update(pss=pss, at_s=now, parts=sorted(parts, key=lambda x: -x[1]))
            peak["rss"] = max(peak["rss"], rss)
            peak["processes"] = max(peak["processes"], n)
            if now - last >= 10:
                timeline.append((round(now, 1), round(pss / 2**30, 2)))
                last = now
            stop.wait(args.interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    result = {
        "command": " ".join(cmd), "returncode": rc, "wall_s": round(wall, 1),
        "peak_pss_gib": round(peak["pss"] / 2**30, 2), "peak_rss_sum_gib": round(peak["rss"] / 2**30, 2),
        "max_processes": peak["processes"], "peak_at_s": round(peak["at_s"], 1),
        "peak_breakdown_gib": [[name, round(b / 2**30, 3)] for name, b in peak["parts"] if b > 2**24],
        "timeline_s_pss_gib": timeline, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.python_version()}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
