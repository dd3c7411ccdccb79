"""`tomtransfer sweep --config SWEEP`: a grid of experiments, its cells running concurrently on the Ray cluster.

  1. checks    every cell's inputs, before anything is written
  2. tracking  one parent MLflow run for the sweep (its id in `<output_dir>/<sweep>/sweep_run_id`); each cell is a
               child run with the same metric names, so MLflow's compare view lines the cells up
  3. groups    cells with the same models and serving settings share one serving app: their adapters are served
               side by side on the one student (multi-LoRA, one adapter name per cell)
  4. cells     each cell's stages (`run.run_stages`) run as a Ray task, at most `max_concurrent` at a time; a task
               asks for no CPU itself (it coordinates), the work it starts asks for its own: Ray Train workers
               (`training.num_workers` x `cpus_per_worker` / GPUs) and the serving replicas it sends requests to
  5. summary   a row per cell (status, the params that differ, the headline metrics) logged to the parent run
               (`sweep_summary.json/.csv`, min/mean/max per metric) and a saved runs-table view of the cells side by
               side (`services.evaluator.tracking.summarize_sweep`); its link is printed
A rerun skips finished cells (a FINISHED child run) and resumes the others stage by stage (fingerprints).
Limits: groups of cells with different models run one group after another (one serving app at a time); on a
local Ray the cells share the machine's cores, so concurrency pays off where cells wait (start-up, HTTP, MLflow)
rather than compute.
"""

from __future__ import annotations

import time
from pathlib import Path

from tomtransfer.shared.config import ExperimentConfig, parse_config
from tomtransfer.shared.errors import UserError
from tomtransfer.shared.sweep import Cell, SweepSpec

from tomtransfer.services.common.checks import serving_api_key
from tomtransfer.services.common.console import say
from tomtransfer.services.common.fingerprint import digest
from tomtransfer.services.evaluator.tracking import start_sweep, summarize_sweep
from tomtransfer.services.pipeline.preflight import preflight
from tomtransfer.services.pipeline.resources import serving, tracking, ui_address, with_tracking
from tomtransfer.services.pipeline.run import run_stages
from tomtransfer.services.pipeline.stages import Context
from tomtransfer.services.teacher.serving import init_ray

# ray is imported where it is used (a slow import; the sweep's checks run before it starts).


def serving_group(cfg: ExperimentConfig) -> str:
    """Cells with the same key can share one serving app: what the app is built from, adapters aside."""
    return digest({"models": cfg.models.model_dump(mode="json"),
                   "serving": cfg.serving.model_dump(mode="json", exclude={"adapters"}),
                   "packs": [str(p) for p in cfg.scenarios.packs]})[:12]


def sweep(spec: SweepSpec, cells: list[Cell], *, max_concurrent: int | None = None) -> list[dict]:
    """Run every unfinished cell; returns one summary row per cell (finished earlier or now), in grid order."""
    limit = max_concurrent or spec.max_concurrent
    for cell in cells:  # every cell's inputs, before the first one writes anything
        preflight(cell.config, "run")
    root = Path(cells[0].config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tracking(cells[0].config) as uri:
        id_file = root / "sweep_run_id"
        sw = start_sweep(uri, cells[0].config.mlflow.experiment, spec.name,
                         params={**{f"grid.{k}": v for k, v in spec.grid.items()}, "cells": len(cells),
                                 "max_concurrent": limit},
                         resume_run_id=id_file.read_text().strip() if id_file.is_file() else None)
        id_file.write_text(sw.run_id + "\n")
        children = sw.children()
        todo = []
        for cell in cells:
            run = children.get(cell.id)
            if run is not None and run.info.status == "FINISHED":
                say(f"[sweep] cell {cell.id}: finished earlier, skipped")
            else:
                todo.append(cell)
        groups: dict[str, list[Cell]] = {}
        for cell in todo:
            groups.setdefault(serving_group(cell.config), []).append(cell)
        seconds: dict[str, float] = {}
        try:
            if groups:
                say(f"[sweep] {len(todo)} cell(s) to run in {len(groups)} serving group(s), at most {limit} at a time")
                seconds = _run_groups(list(groups.values()), sw, root, limit)
        finally:  # the summary (and the parent's status) also when a cell failed
            rows = summarize_sweep(sw, [c.id for c in cells])
        say(f"[sweep] {len(todo)} cell(s) run in {time.perf_counter() - t0:.0f} s; compare them: "
            f"{ui_address(cells[0].config, sw.url(), sw.tracking_uri)}")
    return [r | {"wall_s": round(seconds[r["cell"]], 1)} if r["cell"] in seconds else r for r in rows]


def _run_groups(groups: list[list[Cell]], sw, root: Path, limit: int) -> dict[str, float]:
    """Each group's cells against one serving app; returns each cell's wall time."""
    import ray

    started = init_ray(log_to_driver=True)  # the cells' progress lines reach this terminal / log
    try:
        seconds: dict[str, float] = {}
        for i, group in enumerate(groups, start=1):
            # The app serves every cell's adapter: they all live under the sweep's folder.
            app_cfg = with_tracking(group[0].config, sw.tracking_uri)
            app_cfg = app_cfg.model_copy(update={"serving": app_cfg.serving.model_copy(update={"adapter_root": root})})
            with serving(app_cfg, app_name=f"tomtransfer-sweep-{i}") as url:
                ctx = Context(tracking_uri=sw.tracking_uri, url=url, api_key=serving_api_key(app_cfg))
                seconds |= _run_cells(group, ctx, sw, limit)
        return seconds
    finally:
        if started:
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def _run_cells(cells: list[Cell], ctx: Context, sw, limit: int) -> dict[str, float]:
    """The cells as Ray tasks, at most `limit` in flight; a failed cell fails the sweep after the others finish."""
    import ray

    # On a local cluster RAY_ADDRESS tells the training stage it runs on a cluster: its workers wait for free
    # resources (another cell's training) instead of failing the local pre-check.
    address = ray.get_runtime_context().gcs_address
    task = ray.remote(num_cpus=0, max_retries=0)(_cell_task).options(
        runtime_env={"env_vars": {"RAY_ADDRESS": address, "TOKENIZERS_PARALLELISM": "false"}})
    pending = list(cells)
    running: dict = {}
    seconds, errors = {}, []
    while pending or running:
        while pending and len(running) < limit:
            cell = pending.pop(0)
            say(f"[sweep] cell {cell.id}: started {cell.overrides}")
            ref = task.remote(cell.config.model_dump(mode="json"), {**ctx.__dict__}, sw.child_tags(cell.id))
            running[ref] = cell
        done, _ = ray.wait(list(running), num_returns=1)
        cell = running.pop(done[0])
        try:
            _, wall = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - reported with the cell, the others go on
            errors.append(f"cell {cell.id}: {str(e).strip().splitlines()[-1]}")
            say(f"[sweep] cell {cell.id}: FAILED ({errors[-1]})")
            continue
        seconds[cell.id] = wall
        say(f"[sweep] cell {cell.id}: done in {wall:.0f} s ({len(seconds)} of {len(cells)} in this group)")
    if errors:
        raise UserError(f"{len(errors)} sweep cell(s) failed (rerun to resume them): " + "; ".join(errors))
    return seconds


def _cell_task(cfg_data: dict, ctx_data: dict, tags: dict) -> tuple[str, float]:
    """One cell's stages, in a Ray worker (the config travels as data and is validated again there)."""
    t0 = time.perf_counter()
    res = run_stages(parse_config(cfg_data, "<sweep cell>"), Context(**ctx_data), tags=tags)
    return res.mlflow_run_id, time.perf_counter() - t0
