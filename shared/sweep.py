"""Sweeps: a grid of overrides on one base experiment; each cell is a complete, validated config.

```yaml
name: targets-vs-temperature
base: demo.yaml                 # relative to this file
max_concurrent: 4               # cells running at once on the Ray cluster
grid:                           # dotted config keys -> values; the cells are the cartesian product
  models.student.model: [smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct]
  generate.targets: [answer_motivation, answer]
  sampling.temperature: [0.8]
  sampling.seed: [0, 1]
```
Each cell's adapter is served as `student:<training.adapter_name>-<cell hash>` (its placebo control, under
`training.placebo`, as `...-<cell hash>-placebo`), so the cells that share a serving app (the same models and
serving settings) never overwrite each other's adapters. `training.placebo: [false, true]` is a grid key like any
other: the cells with it on train and evaluate the placebo beside the real adapter.
A cell's id is a readable slug of its values plus a short hash of the overrides, so it is stable
across reruns (completed cells are found again and skipped) and unique within the sweep.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tomtransfer.shared.config import ConfigError, ExperimentConfig, load_config, parse_config


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: Path
    grid: dict[str, list[Any]]
    max_cells: int = Field(default=64, ge=1)
    # Cells running at once on the Ray cluster (1: one after another).
    max_concurrent: int = Field(default=4, ge=1)

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("grid must name at least one key")
        for key, values in v.items():
            if not values:
                raise ValueError(f"grid.{key}: give at least one value")
            if len(values) != len({json.dumps(x, sort_keys=True) for x in values}):
                raise ValueError(f"grid.{key}: duplicate values")
        return v


@dataclass(frozen=True)
class Cell:
    id: str
    overrides: dict[str, Any]
    config: ExperimentConfig


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"grid key {dotted!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:24] or "x"


CELL_ID_MAX = 100  # the readable part is cut, never the hash: two cells can never share a run folder


def cell_id(overrides: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:12]
    readable = "-".join(_slug(overrides[k]) for k in sorted(overrides))[:CELL_ID_MAX - len(digest) - 1]
    return f"{readable.rstrip('-')}-{digest}"


def load_sweep(path: str | Path) -> tuple[SweepSpec, list[Cell]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
        spec = SweepSpec.model_validate(data)
    except yaml.YAMLError:
        raise ConfigError(f"{path}: invalid YAML") from None
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    base_path = spec.base if spec.base.is_absolute() else path.parent / spec.base
    base = load_config(base_path)
    n = 1
    for values in spec.grid.values():
        n *= len(values)
    if n > spec.max_cells:
        raise ConfigError(f"{path}: the grid has {n} cells, more than max_cells = {spec.max_cells}")
    base_data = base.model_dump(mode="json")
    if "roles" not in base.evaluate.model_fields_set:
        base_data["evaluate"].pop("roles")  # derived per cell (training.placebo adds student_placebo), not fixed here
    cells = []
    for combo in itertools.product(*spec.grid.values()):
        overrides = dict(zip(spec.grid, combo))
        data = json.loads(json.dumps(base_data))
        for key, value in overrides.items():
            _set(data, key, value)
        cid = cell_id(overrides)
        data["name"] = f"{spec.name[:120 - len(cid) - 1]}-{cid}"  # the hash always survives
        data["output_dir"] = str(Path(base.output_dir) / spec.name)
        # cells sharing one serving app serve their adapters side by side (multi-LoRA): one name per cell
        data.setdefault("training", {})["adapter_name"] = f"{base.training.adapter_name}-{cid[-12:]}"
        cfg = parse_config(data, f"{path} cell {cid}")
        cells.append(Cell(id=cid, overrides=overrides, config=cfg))
    return spec, cells
