"""Progress on a non-terminal stdout/stderr (a log file, CI, a RayJob's log): plain periodic lines."""

from __future__ import annotations

from tomtransfer.services.collector.runner import Job, _Progress
from tomtransfer.shared.scenarios import default_catalog


def _job(sid: str, n: int) -> Job:
    return Job(role="teacher", model="teacher", scenario=default_catalog().scenarios[sid], messages=[], n=n)


def test_lines_count_only_new_work_and_end_with_the_total(capsys):
    a, b = _job("IR_prison", 4), _job("IR_staghunt", 4)
    with _Progress(False, total=8, done=2, description="generate", lines=True, every_s=0.0) as bar:
        bar.add(a, 2)  # resumed: 2 samples were there before
        bar.add(b, 0)
        bar.advance(a, 2)
        bar.advance(b, 4)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[progress]")]
    assert lines[0].startswith("[progress] generate: 2/8 (25 %)")
    assert lines[1].startswith("[progress] generate: 4/8 (50 %)") and "ETA" in lines[1]
    assert lines[-1].startswith("[progress] generate: 8/8 (100 %)")


def test_silent_when_asked(capsys):
    with _Progress(False, total=1, done=0, description="x", lines=False) as bar:
        bar.add(_job("IR_prison", 1), 0)
        bar.advance(_job("IR_prison", 1), 1)
    assert capsys.readouterr().err == ""
