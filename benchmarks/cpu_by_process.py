"""Where a long command's CPU goes, per kind of process: samples every process's CPU time from /proc while the
command runs (Ray's workers, Serve replicas, vLLM, pytest workers, ... are separate processes, so `time` on the
command sees only the part its own children report when they are waited for).

Run: `python -m benchmarks.cpu_by_process --out DIR -- make test`: writes DIR/ps.json (pid, last cmdline, first and
last CPU seconds seen, ppid, started during the command) and DIR/cpu_by_process.txt (CPU-s per kind, most first), and exits with the command's
status. `--regroup DIR` rewrites DIR/cpu_by_process.txt from its ps.json (after a change to `kind`). Limits: a process that lives less than one interval is missed, and the CPU a process spends after the last
sample before it dies (< one interval) is lost; what was running before the command started counts only its growth.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil


def snapshot() -> dict[str, tuple[float, str, str]]:
    """pid -> (user + system CPU seconds of the process's threads, cmdline, ppid)."""
    out = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times", "ppid"]):
        info = proc.info
        if info["cpu_times"] is None:  # gone or not ours to read
            continue
        out[str(proc.pid)] = (info["cpu_times"].user + info["cpu_times"].system, " ".join(info["cmdline"] or []).strip(),
                              str(info["ppid"]))
    return out


def kind(cmd: str) -> str:
    """A readable kind for a command line (Ray's process titles, python -m modules, pytest roles)."""
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    for pattern, name in ((r"tomtransfer\.services\.cli|bin/tomtransfer", "tomtransfer CLI"),
                          (r"exec\(eval\(sys\.stdin", "pytest worker (xdist)"), (r"-m pytest", "pytest"),
                          (r"train_loop_per_worker", "training loop (plain process)"),
                          (r"gcs_server", "gcs_server"), (r"raylet", "raylet"), (r"log_monitor", "log_monitor"),
                          (r"dashboard/agent|dashboard_agent", "dashboard agent"), (r"dashboard\.py", "dashboard"),
                          (r"monitor\.py|autoscaler", "autoscaler"), (r"runtime_env", "runtime env agent"),
                          (r"mlflow.*server|gunicorn|uvicorn", "mlflow server"), (r"chrom", "chromium"),
                          (r"^VLLM|vllm serve", "vllm"), (r"pip ", "pip"), (r"helm", "helm")):
        if re.search(pattern, cmd):
            return name
    return (cmd.split() or ["?"])[0][-40:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    ap.add_argument("--regroup", action="store_true", help="only regroup OUT/ps.json")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.regroup:
        rows = json.loads((args.out / "ps.json").read_text())
        head = (args.out / "cpu_by_process.txt").read_text().splitlines()[:2]
        return report(args.out, rows, head)
    if not command:
        ap.error("give the command after --")
    args.out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, list] = {}  # pid -> [cmdline, cpu first seen, cpu last seen, ppid]
    done = threading.Event()

    def sample():
        while not done.is_set():
            for pid, (cpu, cmd, ppid) in snapshot().items():
                row = seen.setdefault(pid, [cmd, cpu, cpu, ppid])
                row[2] = cpu
                if cmd:
                    row[0] = cmd  # the last title: Ray workers rename themselves when they take an actor
            done.wait(args.interval)

    before = set(snapshot())
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.time()
    rc = subprocess.call(command)
    done.set()
    thread.join()
    rows = [(pid, cmd, first, last, ppid, pid not in before) for pid, (cmd, first, last, ppid) in seen.items()]
    (args.out / "ps.json").write_text(json.dumps(rows))
    head = [f"command: {' '.join(command)}", f"wall {time.time() - t0:.0f} s, exit {rc}"]
    report(args.out, rows, head)
    return rc


def report(out: Path, rows: list, head: list[str]) -> int:
    """CPU-s per kind into out/cpu_by_process.txt: a process started during the command counts all its CPU, one
    alive before it only its growth (rows without that flag, from an older ps.json: growth only)."""
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for pid, cmd, first, last, _, *new in rows:
        used = last if new and new[0] else last - first
        if used > 0:
            row = by_kind[kind(cmd)]
            row[0] += used
            row[1] += 1
    total = sum(v[0] for v in by_kind.values())
    lines = head + [f"total CPU-s {total:.0f}"]
    lines += [f"{cpu:8.1f} {n:5d}  {k}" for k, (cpu, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])]
    (out / "cpu_by_process.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:25]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
