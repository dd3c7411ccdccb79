"""Evaluation results -> metrics: the paper's analyses (and the alignment figures) over evaluated samples.

Two inputs, one output (`EvaluationResult`):

* **sampled** (`evaluate_samples`): the raw samples Parquet of the evaluate stage, one row a sample, columns
  `role` (teacher | student_base | student_finetuned), `scenario_id`, `family`, `context`, `game`,
  `sample_index`, `answer` ('C' / 'D' / the PGG amount as a number string ('7', '7.5'), or null), `valid` (bool), `model`, ...
  Every (role, scenario) must hold exactly N rows with distinct `sample_index` (valid + invalid = N; checked,
  N = `expected_samples` when given). Cooperation rate = C / valid answers, the paper's convention
  (`shared.metrics.Counts`); the invalid count is reported next to it, never dropped.
* **exact** (`evaluate_exact`): `exact.parquet`, one row per (role, scenario_id, family, context, game) with
  `p_C`, `p_D`, `valid_mass` and, for the PGG, `pgg_dist` (a JSON list of probabilities over 0..endowment) or
  `distribution` (the serving store's JSON object {"0": p, ..., "10": p}, `services.collector.store.EXACT_SCHEMA`).
  Rate = p_C / (p_C + p_D), the probability of C among valid answers - correct whether the server reports
  joint or already-conditional probabilities; `1 - valid_mass` is the invalid probability.

What is computed, all with the domain core (`shared.metrics`, `shared.stats`), nothing re-implemented:

* per role x scenario: counts (n, valid, invalid, C, D) and the rate;
* per scenario (all three roles present): improvement, class, unstable flag, bootstrap CI of the
  improvement, bridging, Jensen-Shannon divergences (base-teacher, ft-teacher) - `shared.metrics.scenario_result`;
* per 2x2 family (in_sample, oos_context, oos_game) and over all of them: aggregates of improvement
  (mean/median/sd/se/min/max/bootstrap CI), by game and by context, class counts, unstable ids, mean bridging
  and JS, mean rates per role by game and by context (Fig. 2);
* Table 1: student_finetuned, every in-sample scenario against its doubled-payoff `_x2` counterpart
  (`shared.stats.table1_ztest`, n = valid answers), with the AVERAGE / MEDIAN lines (`table1_summary`);
* the public-goods game: per-role mean/sd/se/n, improvement of the mean, Welch tests
  (`shared.stats.pgg_analysis`), JS divergence of the contribution distributions and bridging of the means.

Exact mode conventions (noise-free probabilities instead of counts):

* improvement, class, bridging and JS are computed from the probabilities; there is **no sampling CI**
  (`ci95` is None: there is no sampling noise to bound);
* Table 1 and the `unstable` flag need a sample size: they use an **effective n** = the configured number of
  samples (`evaluate.samples`, paper 300), i.e. "what a sampled run of that size would conclude if its
  frequencies equalled these probabilities" (counts c = p x n, not rounded);
* PGG: mean and sd are those of the contribution distribution; se = sd / sqrt(n_eff); Welch tests from these
  summary statistics with n_eff per role (`scipy.stats.ttest_ind_from_stats`).

`EvaluationResult.flat_metrics()` gives MLflow metric names (letters, digits, `_ - .` only) -> values; values
that are undefined (no teacher-base gap, too few values, ...) are left out rather than logged as NaN.
Name scheme (`{family}` in in_sample | oos_context | oos_game | all, `{sid}` a scenario id):

  rate.{role}.{family}.{sid}            cooperation rate (C / valid)
  invalid_rate.{role}.{family}.{sid}    invalid / N (exact: 1 - valid_mass)
  improvement.{family}.{sid}            improvement in percent
  improvement_ci_low|high.{family}.{sid}   bootstrap 95 % CI (sampled only)
  unstable.{family}.{sid}               1 if the teacher-base gap is within noise
  bridging.{family}.{sid}, js.base_teacher|ft_teacher.{family}.{sid}
  improvement_{mean,median,sd,se,min,max,n,ci_low,ci_high}.{family}
  improvement_{mean,se,n}.{family}.game.{game}, improvement_{mean,se,n}.{family}.context.{context}
  classes.{family}.{exacerbation|partial|overcorrection|undefined}, unstable_count.{family}
  bridging_mean.{family}, js_mean.base_teacher|ft_teacher.{family}
  rate_mean.{role}.{family} (+ .game.{game} / .context.{context}), invalid_rate_mean.{role}.{family}
  table1.{p_normal,p_doubled,difference,se,z,p_value,z_two_sample,p_two_sided}.{sid}
  table1.{average,median}.{column}, table1.significant_count, table1.n
  pgg.{mean,sd,se,n,invalid_rate}.{role}, pgg.improvement, pgg.welch_{t,p,difference}.{a}_vs_{b},
  pgg.js.base_teacher|ft_teacher, pgg.bridging     (another PGG scenario id X: pgg.X.mean.{role}, ...)
  samples.{role}, invalid.{role}                 totals over all scenarios (sampled: counts)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from tomtransfer.shared.config import ALL_FAMILIES
from tomtransfer.shared.samples import EXACT_FILE, ROLES, SAMPLE_KEY, check_unique
from tomtransfer.shared.samples import read_samples as read_sample_files
from tomtransfer.shared.errors import UserError
from tomtransfer.shared.metrics import (
    CLASSES,
    Aggregate,
    Counts,
    ScenarioResult,
    aggregate,
    binary_js,
    bridging,
    class_counts,
    classify,
    group_by,
    improvement,
    js_divergence,
    scenario_result,
    unstable,
)
from tomtransfer.shared.parsing import _DECORATION, _LEADING  # the leading-answer rule exact mode reads (mixture teacher)
from tomtransfer.shared.stats import PGG_ROLES, ZTestRow, moments, pgg_analysis, table1_summary, table1_ztest
from tomtransfer.shared.transfer import Choice, Estimate, GroupTransfer, analyze_group, mean_transfer, split_improvement

# ROLES (teacher, student_base, student_finetuned) comes from tomtransfer.shared.samples, the sample's one home
TWO_BY_TWO: tuple[str, ...] = tuple(f for f in ALL_FAMILIES if f != "pgg")
CORE_ROLES = ("teacher", "student_base", "student_finetuned")  # what the paper's improvement needs
PLACEBO_ROLE = "student_placebo"  # optional: the same recipe on targets permuted across scenarios
SAMPLE_REQUIRED = ("role", "scenario_id", "family", "context", "game", "sample_index", "answer", "valid")
EXACT_REQUIRED = ("role", "scenario_id", "family", "context", "game", "p_C", "p_D", "valid_mass")
EXACT_PARQUET = EXACT_FILE
_DOUBLED = re.compile(r"_x\d+(?:\.\d+)?$")


class EvaluationDataError(UserError):
    """Evaluation results that cannot be turned into metrics (missing columns, wrong counts, duplicates)."""


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class RoleRate:
    """One role on one scenario. Sampled: counts; exact: probabilities (counts None, n = effective n)."""

    role: str
    scenario_id: str
    family: str
    context: str
    game: str
    model: str | None
    n: int
    valid: int | None
    invalid: int | None
    cooperate: int | None
    rate: float | None  # the rate improvement uses (`rate_basis`); None for the PGG or where undefined
    invalid_rate: float | None
    valid_mass: float | None = None  # exact mode only
    rate_count: float | None = None  # C out of all N (exact: P(leading answer is C)); invalid counts as not C
    rate_conditional: float | None = None  # C out of valid answers (exact: p_C / (p_C + p_D))
    source: str = "sample"  # sample | exact | dataset (the teacher's generated samples) | mixture
    choice: Choice | None = None  # 2x2: how the answers were measured (counts, exact, mixture), for `transfer`

    @property
    def valid_share(self) -> float | None:
        return None if self.invalid_rate is None else 1.0 - self.invalid_rate

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FamilySummary:
    family: str
    scenarios: int
    improvement: Aggregate
    by_game: dict[str, Aggregate]
    by_context: dict[str, Aggregate]
    classes: dict[str, int]
    unstable: tuple[str, ...]
    bridging: Aggregate
    js_base_teacher: Aggregate
    js_ft_teacher: Aggregate
    low_valid: tuple[str, ...] = ()  # scenarios where a role's valid share is under the threshold
    excluded: tuple[str, ...] = ()  # of those, left out of the aggregates (conditional rate)
    strategy: GroupTransfer | None = None  # transfer / format / association / placebo (`shared.transfer`)
    strategy_by_game: dict[str, GroupTransfer] = field(default_factory=dict)
    strategy_by_context: dict[str, GroupTransfer] = field(default_factory=dict)

    def headline(self, what: str, role: str = "student_finetuned"):
        """The fine-tuned student's transfer / format estimate (None where not computed)."""
        return getattr(self.strategy, what, {}).get(role) if self.strategy else None

    def to_dict(self) -> dict:
        st = self.strategy
        lead = {
            "transfer": self.headline("transfer").to_dict() if self.headline("transfer") else None,
            "format": self.headline("format").to_dict() if self.headline("format") else None,
            "association": ({k: v.to_dict() for k, v in st.association.items()} if st else None),
            "association_gain": st.association_gain.to_dict() if st and st.association_gain else None,
            "placebo_difference": st.placebo_difference.to_dict() if st and st.placebo_difference else None,
            "transfer_placebo": (st.transfer[PLACEBO_ROLE].to_dict() if st and PLACEBO_ROLE in st.transfer else None),
            "strategy": st.to_dict() if st else None,
            "transfer_by_game": {k: v.to_dict() for k, v in self.strategy_by_game.items()},
            "transfer_by_context": {k: v.to_dict() for k, v in self.strategy_by_context.items()},
        }
        return lead | {
            "family": self.family, "scenarios": self.scenarios, "improvement": self.improvement.to_dict(),
            "low_valid": list(self.low_valid), "excluded": list(self.excluded),
            "by_game": {k: v.to_dict() for k, v in self.by_game.items()},
            "by_context": {k: v.to_dict() for k, v in self.by_context.items()},
            "classes": dict(self.classes), "unstable": list(self.unstable), "bridging": self.bridging.to_dict(),
            "js_base_teacher": self.js_base_teacher.to_dict(), "js_ft_teacher": self.js_ft_teacher.to_dict(),
        }


@dataclass(frozen=True)
class PggResult:
    """One public-goods scenario: per-role moments, improvement of the mean, Welch tests, alignment."""

    scenario_id: str
    endowment: int
    roles: dict[str, dict]  # role -> {mean, sd, se, n, valid, invalid, invalid_rate}
    distributions: dict[str, list[float]]  # role -> P(contribution = k), k = 0..endowment
    improvement: float | None
    tests: dict[str, dict]  # "a_vs_b" -> {difference, t, df, p_value}
    js_base_teacher: float | None
    js_ft_teacher: float | None
    bridging: float | None
    notes: tuple[str, ...] = ()  # e.g. a zero-variance role, where Welch's test is undefined
    # format-free transfer (the mean of valid contributions), per student role, and the placebo difference
    transfer: dict[str, Estimate] = field(default_factory=dict)
    format: dict[str, float] = field(default_factory=dict)  # student role -> valid share change vs base, pp
    placebo_difference: Estimate | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvaluationResult:
    estimator: str  # "sample" | "exact" | "mixed" (roles measured differently, e.g. the paper's protocol)
    samples: int | None  # N per (role, scenario); exact: the effective n
    roles: tuple[str, ...]
    models: dict[str, str]
    rates: tuple[RoleRate, ...]
    scenarios: tuple[ScenarioResult, ...]
    families: dict[str, FamilySummary]
    overall: FamilySummary | None  # all 2x2 scenarios of all families together ("all")
    rate_means: dict[str, dict[str, dict]]  # family -> role -> {mean, invalid_mean, game: {}, context: {}}
    table1: tuple[ZTestRow, ...]
    table1_summary: dict[str, dict]
    pgg: dict[str, PggResult]
    notes: tuple[str, ...] = field(default_factory=tuple)
    rate_basis: str = "conditional"  # "count" (C / N) or "conditional" (C / valid)
    min_valid_share: float = 0.0
    protocol: str | None = None  # how each role was measured, one line

    # ----------------------------------------------------------------------------- views
    def scenarios_of(self, family: str) -> list[ScenarioResult]:
        return [s for s in self.scenarios if s.family == family]

    def rates_of(self, family: str, role: str | None = None) -> list[RoleRate]:
        return [r for r in self.rates if r.family == family and (role is None or r.role == role)]

    @property
    def unstable_scenarios(self) -> list[ScenarioResult]:
        return [s for s in self.scenarios if s.unstable and s.improvement is not None]

    def to_dict(self) -> dict:
        return {
            "estimator": self.estimator,
            "rate_basis": self.rate_basis,
            "min_valid_share": self.min_valid_share,
            "protocol": self.protocol,
            "samples": self.samples,
            "roles": list(self.roles),
            "models": dict(self.models),
            "rates": [r.to_dict() for r in self.rates],
            "scenarios": [s.to_dict() for s in self.scenarios],
            "families": {k: v.to_dict() for k, v in self.families.items()},
            "overall": self.overall.to_dict() if self.overall else None,
            "rate_means": self.rate_means,
            "table1": {"rows": [r.to_dict() | {"stars": r.stars} for r in self.table1],
                       "summary": self.table1_summary},
            "pgg": {k: v.to_dict() for k, v in self.pgg.items()},
            "notes": list(self.notes),
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        return path

    # ----------------------------------------------------------------------------- MLflow
    def flat_metrics(self) -> dict[str, float]:
        """{stable MLflow metric name: value}; undefined values are left out (see the module docstring)."""
        m: dict[str, float] = {}

        def put(name: str, value) -> None:
            if value is None:
                return
            if isinstance(value, (bool, np.bool_)):
                value = int(value)
            v = float(value)
            if math.isnan(v) or math.isinf(v):
                return
            m[metric_name(name)] = v

        for r in self.rates:
            if r.family == "pgg":
                continue
            put(f"rate.{r.role}.{r.family}.{r.scenario_id}", r.rate)
            put(f"rate_count.{r.role}.{r.family}.{r.scenario_id}", r.rate_count)
            put(f"rate_conditional.{r.role}.{r.family}.{r.scenario_id}", r.rate_conditional)
            put(f"valid_share.{r.role}.{r.family}.{r.scenario_id}", r.valid_share)
            put(f"invalid_rate.{r.role}.{r.family}.{r.scenario_id}", r.invalid_rate)
        for role in self.roles:
            rr = [r for r in self.rates if r.role == role]
            if self.estimator == "sample":
                put(f"samples.{role}", sum(r.n for r in rr))
                put(f"invalid.{role}", sum(r.invalid or 0 for r in rr))
            else:
                put(f"scenarios.{role}", len(rr))
        for s in self.scenarios:
            key = f"{s.family}.{s.id}"
            put(f"improvement.{key}", s.improvement)
            put(f"improvement_format.{key}", s.improvement_format)
            put(f"improvement_choice.{key}", s.improvement_choice)
            if s.ci95:
                put(f"improvement_ci_low.{key}", s.ci95[0])
                put(f"improvement_ci_high.{key}", s.ci95[1])
            if s.improvement is not None:
                put(f"unstable.{key}", s.unstable)
            put(f"bridging.{key}", s.bridging)
            put(f"js.base_teacher.{key}", s.js_base_teacher)
            put(f"js.ft_teacher.{key}", s.js_ft_teacher)
        fams = list(self.families.values()) + ([self.overall] if self.overall else [])
        for f in fams:
            a = f.improvement
            for stat in ("mean", "median", "sd", "se", "min", "max"):
                put(f"improvement_{stat}.{f.family}", getattr(a, stat))
            put(f"improvement_n.{f.family}", a.n)
            if a.ci95:
                put(f"improvement_ci_low.{f.family}", a.ci95[0])
                put(f"improvement_ci_high.{f.family}", a.ci95[1])
            for kind, groups in (("game", f.by_game), ("context", f.by_context)):
                for g, agg in groups.items():
                    put(f"improvement_mean.{f.family}.{kind}.{g}", agg.mean)
                    put(f"improvement_se.{f.family}.{kind}.{g}", agg.se)
                    put(f"improvement_n.{f.family}.{kind}.{g}", agg.n)
            for c, n in f.classes.items():
                put(f"classes.{f.family}.{c}", n)
            put(f"unstable_count.{f.family}", len(f.unstable))
            put(f"low_valid_count.{f.family}", len(f.low_valid))
            put(f"excluded_count.{f.family}", len(f.excluded))
            put(f"bridging_mean.{f.family}", f.bridging.mean)
            if f.strategy:
                _put_strategy(put, f.family, f.strategy)
                for kind, groups in (("game", f.strategy_by_game), ("context", f.strategy_by_context)):
                    for g, st in groups.items():
                        for role, e in st.transfer.items():
                            put(f"transfer_mean.{_short(role)}.{f.family}.{kind}.{g}", e.mean)
            put(f"js_mean.base_teacher.{f.family}", f.js_base_teacher.mean)
            put(f"js_mean.ft_teacher.{f.family}", f.js_ft_teacher.mean)
        for fam, by_role in self.rate_means.items():
            for role, d in by_role.items():
                put(f"rate_mean.{role}.{fam}", d["mean"])
                put(f"invalid_rate_mean.{role}.{fam}", d["invalid_mean"])
                put(f"valid_share_mean.{role}.{fam}", d.get("valid_mean"))
                for kind in ("game", "context"):
                    for g, v in d[kind].items():
                        put(f"rate_mean.{role}.{fam}.{kind}.{g}", v)
        cols = ("p_normal", "p_doubled", "difference", "se", "z", "p_value", "z_two_sample", "p_two_sided")
        for row in self.table1:
            for col in cols:
                put(f"table1.{col}.{row.id}", getattr(row, col))
        if self.table1:
            put("table1.n", len(self.table1))
            put("table1.significant_count", sum(r.p_value is not None and r.p_value < 0.05 for r in self.table1))
        for line, values in self.table1_summary.items():
            for col, v in values.items():
                put(f"table1.{line}.{col}", v)
        for sid, p in self.pgg.items():
            pre = "pgg" if sid == "pgg" else f"pgg.{sid}"
            for role, d in p.roles.items():
                for stat in ("mean", "sd", "se", "n", "invalid_rate"):
                    put(f"{pre}.{stat}.{role}", d.get(stat))
            put(f"{pre}.improvement", p.improvement)
            for name, t in p.tests.items():
                put(f"{pre}.welch_t.{name}", t.get("t"))
                put(f"{pre}.welch_p.{name}", t.get("p_value"))
                put(f"{pre}.welch_difference.{name}", t.get("difference"))
            put(f"{pre}.js.base_teacher", p.js_base_teacher)
            put(f"{pre}.js.ft_teacher", p.js_ft_teacher)
            put(f"{pre}.bridging", p.bridging)
            for role, e in p.transfer.items():
                put(f"{pre}.transfer.{_short(role)}", e.mean)
                if e.ci95:
                    put(f"{pre}.transfer_ci_low.{_short(role)}", e.ci95[0])
                    put(f"{pre}.transfer_ci_high.{_short(role)}", e.ci95[1])
            for role, v in p.format.items():
                put(f"{pre}.format.{_short(role)}", v)
            if p.placebo_difference:
                put(f"{pre}.placebo_difference", p.placebo_difference.mean)
        return m


def _short(role: str) -> str:
    return {"student_finetuned": "ft", "student_placebo": "placebo", "student_base": "base"}.get(role, role)


def _put_strategy(put, family: str, st: GroupTransfer) -> None:
    """MLflow names of the strategic numbers: transfer_{mean,ci_low,ci_high,n}.{ft|placebo}.{family},
    format_{mean,ci_low,ci_high}.{ft|placebo}.{family} (percentage points of valid share), association.{role}.{family}
    (+ _ci_low/_ci_high), association_gain.{family}, placebo_difference{,_ci_low,_ci_high}.{family}."""
    def est(name, e):
        if e is None:
            return
        put(f"{name}.{family}" if name.count(".") == 0 else f"{name}.{family}", e.mean)
        if e.ci95:
            head, _, tail = name.partition(".")
            put(f"{head}_ci_low{'.' + tail if tail else ''}.{family}", e.ci95[0])
            put(f"{head}_ci_high{'.' + tail if tail else ''}.{family}", e.ci95[1])
    for role, e in st.transfer.items():
        est(f"transfer_mean.{_short(role)}", e)
        put(f"transfer_n.{_short(role)}.{family}", e.n)
    for role, e in st.format.items():
        est(f"format_mean.{_short(role)}", e)
    for role, e in st.association.items():
        est(f"association.{_short(role)}", e)
    est("association_gain", st.association_gain)
    est("placebo_difference", st.placebo_difference)
    for role, v in st.valid_share.items():
        put(f"valid_share_mean_2x2.{_short(role)}.{family}", v)


_METRIC_BAD = re.compile(r"[^A-Za-z0-9_.\-]")


def metric_name(name: str) -> str:
    """An MLflow-safe metric name: anything but letters, digits, `_`, `-`, `.` becomes `_`; no empty parts."""
    name = _METRIC_BAD.sub("_", name)
    return re.sub(r"\.{2,}", ".", name).strip(".")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------ loading
def read_samples(paths) -> pd.DataFrame:
    """Raw samples from Parquet files or folders of them (`shared.samples.read_samples`; `exact.parquet` is
    skipped). Only the columns the metrics use are read (not the prompts and responses), to keep memory small."""
    df = read_sample_files(paths, columns=[*SAMPLE_REQUIRED, "model", "run_id", "source"], required=SAMPLE_REQUIRED,
                           error=EvaluationDataError)
    _require(df, SAMPLE_REQUIRED, "samples")
    return df


def read_exact(path) -> pd.DataFrame:
    p = Path(path)
    if p.is_dir():
        p = p / EXACT_PARQUET
    if not p.is_file():
        raise EvaluationDataError(f"exact results not found: {p}")
    df = pd.read_parquet(p)
    _require(df, EXACT_REQUIRED, str(p))
    return df


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise EvaluationDataError(f"{what} lack column(s): {', '.join(missing)}")
    roles = set(df["role"].astype(str)) - set(ROLES)
    if roles:
        raise EvaluationDataError(f"{what}: unknown role(s) {', '.join(sorted(roles))} (expected {', '.join(ROLES)})")


def _is_missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA


# ------------------------------------------------------------------------------------------ ordering
def _order_key():
    """Scenarios in catalog order (family, then the built-in order); unknown ids after, alphabetically."""
    from tomtransfer.shared.scenarios import default_catalog

    known = {sid: i for i, sid in enumerate(default_catalog().scenarios)}
    fam = {f: i for i, f in enumerate(ALL_FAMILIES)}
    return lambda family, sid: (fam.get(family, len(fam)), known.get(sid, len(known)), sid)


def _endowment(sid: str, observed: int | None = None) -> int:
    from tomtransfer.shared.scenarios import default_catalog

    s = default_catalog().scenarios.get(sid)
    e = getattr(s.game, "endowment", None) if s is not None else None
    if e is None:  # not a built-in scenario (a pack's): what the data shows, else the paper's 10
        return int(observed) if observed else 10
    return max(int(e), observed or 0)


# ------------------------------------------------------------------------------------------ per-role rates
@dataclass
class _Part:
    """What one source (raw samples or exact rows) says about the (role, scenario) pairs it holds."""

    rates: list[RoleRate] = field(default_factory=list)
    meta: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # sid -> (family, context, game)
    pgg_values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # sampled contributions
    pgg_dists: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # exact distributions
    models: dict[str, str] = field(default_factory=dict)
    leads: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # exact leading-answer mass
    tails: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)  # C/D/invalid w/o a lead


def _leads_with_letter(text) -> bool:
    """Whether a response leads with its answer (the first parsing rule, the part exact mode measures)."""
    return isinstance(text, str) and _LEADING.match(text.lstrip(_DECORATION)) is not None


def _basis_rate(basis: str, count: float | None, conditional: float | None) -> float | None:
    return count if basis == "count" else conditional


def _rates_from_samples(df: pd.DataFrame, expected_samples: int | None, basis: str) -> _Part:
    _require(df, SAMPLE_REQUIRED, "samples")
    df = df.copy()
    for col in ("role", "scenario_id", "family", "context", "game"):
        df[col] = df[col].astype(str)
    check_unique(df, SAMPLE_KEY, error=EvaluationDataError)
    part = _Part()
    for (role, sid), g in df.groupby(["role", "scenario_id"], sort=False):
        fam, ctx, game = _one(g, "family", sid), _one(g, "context", sid), _one(g, "game", sid)
        source = _first_str(g, "source") or "sample"
        n = len(g)
        if expected_samples is not None and source == "sample" and n != expected_samples:
            raise EvaluationDataError(f"{role} {sid}: {n} samples, expected exactly {expected_samples}")
        valid_mask = g["valid"].astype(bool).to_numpy()
        answers = g["answer"].tolist()
        bad = [a for a, v in zip(answers, valid_mask) if v and _is_missing(a)]
        if bad:
            raise EvaluationDataError(f"{role} {sid}: {len(bad)} sample(s) marked valid without an answer")
        valid = int(valid_mask.sum())
        invalid = n - valid
        model = _first_str(g, "model")
        if model:
            part.models.setdefault(role, model)
        part.meta[sid] = (fam, ctx, game)
        if fam == "pgg":
            values = []
            for a, v in zip(answers, valid_mask):
                if v:
                    try:
                        values.append(float(str(a)))
                    except ValueError:
                        raise EvaluationDataError(f"{role} {sid}: contribution {a!r} is not a number") from None
            part.pgg_values.setdefault(sid, {})[role] = values
            part.rates.append(RoleRate(role, sid, fam, ctx, game, model, n, valid, invalid, None, None, invalid / n,
                                       source=source))
            continue
        chosen = [str(a).strip().upper() for a, v in zip(answers, valid_mask) if v]
        odd = sorted(set(chosen) - {"C", "D"})
        if odd:
            raise EvaluationDataError(f"{role} {sid}: valid answers must be C or D, got {', '.join(odd)}")
        c = chosen.count("C")
        count, cond = c / n, (c / valid if valid else None)
        part.rates.append(RoleRate(role, sid, fam, ctx, game, model, n, valid, invalid, c, _basis_rate(basis, count, cond),
                                   invalid / n, rate_count=count, rate_conditional=cond, source=source,
                                   choice=Choice.counts(c, valid - c, invalid)))
        if "response" in g.columns:  # the samples that do not lead with a letter: a mixture's remainder
            tail = [str(a).strip().upper() if v else None
                    for a, v, t in zip(answers, valid_mask, g["response"].tolist()) if not _leads_with_letter(t)]
            part.tails[(role, sid)] = (tail.count("C"), tail.count("D"), tail.count(None))
    return part


def _rates_from_exact(df: pd.DataFrame, n: int, basis: str) -> _Part:
    _require(df, EXACT_REQUIRED, "exact results")
    if n < 2:
        raise EvaluationDataError("exact mode needs an effective sample size >= 2")
    df = df.copy()
    for col in ("role", "scenario_id", "family", "context", "game"):
        df[col] = df[col].astype(str)
    dup = df.duplicated(subset=["role", "scenario_id"], keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        raise EvaluationDataError(f"exact results: duplicate rows for {first['role']} {first['scenario_id']}")
    part = _Part()
    for row in df.to_dict(orient="records"):
        role, sid, fam, ctx, game = (row[k] for k in ("role", "scenario_id", "family", "context", "game"))
        part.meta[sid] = (fam, ctx, game)
        if not _is_missing(row.get("part")) and row.get("part") == "lead":
            # the leading-answer mass of a motivated role: combined with its samples into a mixture (`_mixtures`)
            if fam != "pgg":
                part.leads[(role, sid)] = (_prob(row["p_C"], f"{role} {sid}: p_C"), _prob(row["p_D"], f"{role} {sid}: p_D"))
            continue
        model = None if _is_missing(row.get("model")) else (str(row["model"]) if row.get("model") else None)
        if model:
            part.models.setdefault(role, model)
        mass = _prob(row["valid_mass"], f"{role} {sid}: valid_mass")
        if fam == "pgg":
            p = np.asarray(_pgg_distribution(row, f"{role} {sid}"), float)
            if p.ndim != 1 or len(p) < 2 or (p < 0).any() or p.sum() <= 0:
                raise EvaluationDataError(f"{role} {sid}: pgg_dist must be a list of >= 2 probabilities")
            part.pgg_dists.setdefault(sid, {})[role] = (p / p.sum()).tolist()
            part.rates.append(RoleRate(role, sid, fam, ctx, game, model, n, None, None, None, None, 1 - mass, mass,
                                       source="exact"))
            continue
        pc, pd_ = _prob(row["p_C"], f"{role} {sid}: p_C"), _prob(row["p_D"], f"{role} {sid}: p_D")
        # p_C and p_D are joint probabilities (with the invalid mass beside them), so p_C is the count rate.
        cond = pc / (pc + pd_) if pc + pd_ > 0 else None
        part.rates.append(RoleRate(role, sid, fam, ctx, game, model, n, None, None, None, _basis_rate(basis, pc, cond),
                                   1 - mass, mass, rate_count=pc, rate_conditional=cond, source="exact",
                                   choice=Choice.exact(pc, min(pd_, 1 - pc))))
    return part


def _merge(parts: list[_Part]) -> _Part:
    out = _Part()
    seen: dict[tuple[str, str], str] = {}
    for part in parts:
        for r in part.rates:
            if (r.role, r.scenario_id) in seen:
                raise EvaluationDataError(f"{r.role} {r.scenario_id}: results from two sources "
                                          f"({seen[(r.role, r.scenario_id)]} and {r.source})")
            seen[(r.role, r.scenario_id)] = r.source
        out.rates += part.rates
        out.meta.update(part.meta)
        for sid, d in part.pgg_values.items():
            out.pgg_values.setdefault(sid, {}).update(d)
        for sid, d in part.pgg_dists.items():
            out.pgg_dists.setdefault(sid, {}).update(d)
        for role, m in part.models.items():
            out.models.setdefault(role, m)
        out.leads.update(part.leads)
        out.tails.update(part.tails)
    return out


def _mixtures(part: _Part, basis: str, effective_n: int) -> _Part:
    """A role with both an exact leading-answer row and samples (the motivated teacher): P(C) = P(leading C) +
    P(no leading letter) x P(C | no leading letter), the last from its samples that do not lead with a letter.
    The combined rate replaces the sampled one; its noise is the remainder's only, so like an exact role it counts
    with the effective n in Table 1 and the unstable flags."""
    if not part.leads:
        return part
    rates = []
    for r in part.rates:
        lead = part.leads.get((r.role, r.scenario_id))
        if lead is None or r.family == "pgg" or r.source == "exact":
            rates.append(r)
            continue
        choice = Choice.mixture(*lead, *part.tails.get((r.role, r.scenario_id), (0, 0, 0)))
        pc, pd_ = choice.probs()
        cond = choice.q
        rates.append(replace(r, n=effective_n, cooperate=None, valid=None, invalid=None,
                             rate=_basis_rate(basis, pc, cond),
                             rate_count=pc, rate_conditional=cond, invalid_rate=1 - pc - pd_, valid_mass=pc + pd_,
                             source="mixture", choice=choice))
    return replace(part, rates=rates)


# ------------------------------------------------------------------------------------------ per-scenario results
def _scenario(rr: Mapping[str, RoleRate], meta, basis: str, n_resamples: int, seed: int) -> ScenarioResult:
    """`_scenario_paper` with the count-rate improvement split into its format and choice parts."""
    res = _scenario_paper(rr, meta, basis, n_resamples, seed)
    t, b, f = rr["teacher"], rr["student_base"], rr["student_finetuned"]
    if t.choice is None or b.choice is None or f.choice is None:
        return res
    fmt, choice = split_improvement(b.choice, f.choice, t.choice)
    return replace(res, improvement_format=fmt, improvement_choice=choice)


def _scenario_paper(rr: Mapping[str, RoleRate], meta, basis: str, n_resamples: int, seed: int) -> ScenarioResult:
    """Improvement and alignment of one scenario. All three roles counted: the paper's statistics from counts (with
    a bootstrap CI); a role with probabilities (exact mode): the same formulas on the rates, no sampling CI."""
    t, b, f = rr["teacher"], rr["student_base"], rr["student_finetuned"]
    fam, ctx, game = meta
    if all(r.cooperate is not None for r in (t, b, f)):
        den = (lambda r: r.n) if basis == "count" else (lambda r: r.valid)
        counts = Counts(
            id=t.scenario_id, samples=max(t.n, b.n, f.n), c_base=b.cooperate, c_ft=f.cooperate, c_teacher=t.cooperate,
            valid_base=den(b), valid_ft=den(f), valid_teacher=den(t), game=game, context=ctx, family=fam,
        )
        return scenario_result(counts, n_resamples=n_resamples, seed=seed)
    pt, pb, pf = t.rate, b.rate, f.rate
    imp = improvement(pb, pf, pt)
    nt = t.n if basis == "count" or t.valid is None else t.valid
    nb = b.n if basis == "count" or b.valid is None else b.valid
    return ScenarioResult(
        id=t.scenario_id, game=game, context=ctx, family=fam, samples=max(t.n, b.n, f.n), p_base=pb, p_ft=pf,
        p_teacher=pt, improvement=imp, cls=classify(imp), unstable=unstable(pt * nt, nt, pb * nb, nb), ci95=None,
        bridging=bridging(pb, pf, pt), js_base_teacher=binary_js(pb, pt), js_ft_teacher=binary_js(pf, pt),
    )


def evaluate(
    samples: pd.DataFrame | str | Path | Iterable | None = None,
    exact: pd.DataFrame | str | Path | None = None,
    *,
    expected_samples: int | None = None,
    effective_n: int = 300,
    rate: str = "count",
    min_valid_share: float = 0.0,
    protocol: str | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> EvaluationResult:
    """Metrics from raw samples, exact rows, or both (each (role, scenario) from exactly one of them).

    `rate`: "count" (C out of N, the paper's counts) or "conditional" (C out of valid answers).
    `min_valid_share`: scenarios where a role's valid share is lower are flagged; under the conditional rate,
    whose denominator that share is, they are left out of the aggregates. `expected_samples`: exactly N per
    evaluated (role, scenario) (rows with `source` = dataset, the teacher's generated samples, keep their own N)."""
    if rate not in ("count", "conditional"):
        raise EvaluationDataError(f"unknown rate {rate!r}; expected count or conditional")
    parts: list[_Part] = []
    if samples is not None:
        df = samples if isinstance(samples, pd.DataFrame) else read_samples(samples)
        if df.empty:
            raise EvaluationDataError("samples: no rows")
        parts.append(_rates_from_samples(df, expected_samples, rate))
    if exact is not None:
        df = exact if isinstance(exact, pd.DataFrame) else read_exact(exact)
        if df.empty:
            raise EvaluationDataError("exact results: no rows")
        parts.append(_rates_from_exact(df, int(effective_n), rate))
    if not parts:
        raise EvaluationDataError("give sampled results, exact results, or both")
    part = _mixtures(_merge(parts), rate, int(effective_n))
    key = _order_key()
    rates = sorted(part.rates, key=lambda r: (key(r.family, r.scenario_id), ROLES.index(r.role)))
    by_scenario: dict[str, dict[str, RoleRate]] = {}
    for r in rates:
        if r.family != "pgg":
            by_scenario.setdefault(r.scenario_id, {})[r.role] = r
    sources = {r.source for r in rates}
    estimator = "exact" if sources == {"exact"} else ("sample" if "exact" not in sources else "mixed")

    notes: list[str] = []
    if protocol:
        notes.append(protocol)
    if "exact" in sources:
        notes.append(f"exact mode: probabilities, not samples; where a role is exact, improvement has no sampling CI, "
                     f"and Table 1, unstable flags and PGG standard errors use an effective n = {effective_n}")
    results: list[ScenarioResult] = []
    for sid, rr in by_scenario.items():
        if not all(r in rr for r in CORE_ROLES):
            continue
        if any(rr[r].rate is None for r in CORE_ROLES):
            notes.append(f"{sid}: a role gives no valid answer; no improvement")
            continue
        results.append(_scenario(rr, part.meta[sid], rate, n_resamples, seed))
    low_valid = {s.id for s in results
                 if any((by_scenario[s.id][r].valid_share or 0.0) < min_valid_share for r in CORE_ROLES)}

    table1 = []
    for normal_id, doubled_id in _table1_pairs(by_scenario, part.meta):
        a, d = by_scenario[normal_id]["student_finetuned"], by_scenario[doubled_id]["student_finetuned"]
        if a.rate is None or d.rate is None:
            continue
        if a.cooperate is not None and d.cooperate is not None:
            na, nd = (a.n, d.n) if rate == "count" else (a.valid, d.valid)
            table1.append(table1_ztest(normal_id, a.cooperate, na, d.cooperate, nd))
        else:
            table1.append(table1_ztest(normal_id, a.rate * a.n, a.n, d.rate * d.n, d.n))

    pgg = _pgg_results(part, rates, effective_n, n_resamples, seed)
    choices = {sid: {role: r.choice for role, r in rr.items() if r.choice is not None}
               for sid, rr in by_scenario.items()}
    return _assemble(
        estimator, _common_n(rates, expected_samples, effective_n, estimator), rates, results, table1, pgg,
        part.models, notes, n_resamples, rate_basis=rate, min_valid_share=min_valid_share, low_valid=low_valid,
        protocol=protocol, choices=choices, effective_n=int(effective_n), seed=seed,
    )


def _common_n(rates, expected_samples, effective_n, estimator) -> int | None:
    if estimator == "exact":
        return int(effective_n)
    if expected_samples:
        return expected_samples
    n_all = sorted({r.n for r in rates if r.source == "sample"})
    return n_all[0] if len(n_all) == 1 else None


def _pgg_results(part: _Part, rates: list[RoleRate], effective_n: int, n_resamples: int = 2000,
                 seed: int = 0) -> dict[str, PggResult]:
    """Per public-goods scenario: sampled roles from their contributions, exact roles from their distributions."""
    out: dict[str, PggResult] = {}
    rate_of = {(r.role, r.scenario_id): r for r in rates if r.family == "pgg"}
    for sid in dict.fromkeys([*part.pgg_values, *part.pgg_dists]):
        values, dists_exact = part.pgg_values.get(sid, {}), part.pgg_dists.get(sid, {})
        observed = max([int(math.ceil(max(v))) for v in values.values() if v]
                       + [len(d) - 1 for d in dists_exact.values()], default=0)
        e = _endowment(sid, observed)
        dists = {r: _histogram(v, e) for r, v in values.items() if v}
        dists.update({r: list(d) + [0.0] * (e + 1 - len(d)) for r, d in dists_exact.items()})
        roles_d: dict[str, dict] = {}
        notes: list[str] = []
        for r in ROLES:
            rr = rate_of.get((r, sid))
            if rr is None:
                continue
            if r in values:
                v = values[r]
                d = moments(v).to_dict() if v else {"mean": None, "sd": None, "se": None, "n": 0}
                roles_d[r] = d | {"valid": rr.valid, "invalid": rr.invalid, "invalid_rate": rr.invalid_rate}
            else:
                k, p = np.arange(e + 1), np.asarray(dists[r])
                mean = float((k * p).sum())
                sd = float(math.sqrt(max(((k - mean) ** 2 * p).sum(), 0.0)))
                roles_d[r] = {"mean": mean, "sd": sd, "se": sd / math.sqrt(effective_n), "n": effective_n,
                              "invalid_rate": rr.invalid_rate, "valid": None, "invalid": None}
        tests: dict[str, dict] = {}
        imp = None
        if all(r in values and values[r] for r in PGG_ROLES):
            res = pgg_analysis({r: values[r] for r in PGG_ROLES})
            imp, tests = res["improvement"], res["tests"]
            notes += res.get("notes", [])
        elif all(r in roles_d for r in PGG_ROLES):
            for a, b in (("student_finetuned", "student_base"), ("student_finetuned", "teacher"),
                         ("teacher", "student_base")):
                if a in roles_d and b in roles_d and roles_d[a]["mean"] is not None and roles_d[b]["mean"] is not None:
                    tests[f"{a}_vs_{b}"] = _welch_from_stats(roles_d[a], roles_d[b])
        means = {r: (values[r] if r in values else roles_d[r]["mean"]) for r in roles_d
                 if (r in values and values[r]) or (r not in values and roles_d[r]["mean"] is not None)}
        transfer, placebo = mean_transfer(means, n_resamples=n_resamples, seed=seed)
        shares = {r: 1 - d["invalid_rate"] for r, d in roles_d.items() if d.get("invalid_rate") is not None}
        fmt = {r: 100 * (shares[r] - shares["student_base"]) for r in transfer if r in shares
               and "student_base" in shares}
        out[sid] = replace(_pgg_result(sid, e, roles_d, dists, imp, tests), notes=tuple(notes), transfer=transfer,
                           format=fmt, placebo_difference=placebo)
    return out


def evaluate_samples(samples, *, expected_samples: int | None = None, rate: str = "count",
                     min_valid_share: float = 0.0, n_resamples: int = 2000, seed: int = 0) -> EvaluationResult:
    """Metrics from raw samples (see `evaluate`)."""
    return evaluate(samples, expected_samples=expected_samples, rate=rate, min_valid_share=min_valid_share,
                    n_resamples=n_resamples, seed=seed)


def evaluate_exact(exact, *, samples: int = 300, rate: str = "count", min_valid_share: float = 0.0,
                   n_resamples: int = 2000, seed: int = 0) -> EvaluationResult:
    """Metrics from exact-mode probabilities; `samples` is the effective n for Table 1, unstable and PGG se."""
    return evaluate(exact=exact, effective_n=samples, rate=rate, min_valid_share=min_valid_share,
                    n_resamples=n_resamples, seed=seed)


def _one(g: pd.DataFrame, col: str, sid: str) -> str:
    vals = g[col].unique()
    if len(vals) != 1:
        raise EvaluationDataError(f"{sid}: rows disagree on {col} ({', '.join(map(str, vals))})")
    return str(vals[0])


def _first_str(g: pd.DataFrame, col: str) -> str | None:
    if col not in g.columns:
        return None
    vals = [v for v in g[col].tolist() if not _is_missing(v) and str(v)]
    return str(vals[0]) if vals else None


def _histogram(values: Sequence[float], endowment: int) -> list[float]:
    """P(contribution rounds to k), k = 0..endowment: continuous answers ($7.50) binned to whole dollars
    (half up), so sampled and exact distributions share one support for the JS divergence."""
    k = np.clip(np.floor(np.asarray(values, float) + 0.5).astype(int), 0, endowment)
    h = np.bincount(k, minlength=endowment + 1).astype(float)
    return (h / h.sum()).tolist()


def _table1_pairs(by_scenario: Mapping[str, Mapping[str, RoleRate]], meta) -> list[tuple[str, str]]:
    """(in-sample id, its doubled-payoff oos_game id) where both have a student_finetuned entry."""
    pairs = []
    for sid, rr in by_scenario.items():
        if meta[sid][0] != "oos_game" or "student_finetuned" not in rr:
            continue
        normal = _DOUBLED.sub("", sid)
        if normal != sid and normal in by_scenario and meta[normal][0] == "in_sample" \
                and "student_finetuned" in by_scenario[normal]:
            pairs.append((normal, sid))
    key = _order_key()
    return sorted(pairs, key=lambda p: key("in_sample", p[0]))


def _pgg_result(sid, endowment, roles_d, dists, imp, tests) -> PggResult:
    js_b = js_f = br = None
    if "teacher" in dists:
        if "student_base" in dists:
            js_b = js_divergence(dists["student_base"], dists["teacher"])
        if "student_finetuned" in dists:
            js_f = js_divergence(dists["student_finetuned"], dists["teacher"])
    means = {r: d.get("mean") for r, d in roles_d.items()}
    if all(means.get(r) is not None for r in PGG_ROLES):
        br = bridging(means["student_base"], means["student_finetuned"], means["teacher"])
        if imp is None:
            imp = improvement(means["student_base"], means["student_finetuned"], means["teacher"])
    return PggResult(sid, endowment, roles_d, dists, imp, tests, js_b, js_f, br)


def _pgg_distribution(row: Mapping, what: str) -> list[float]:
    """P(contribution = k), k = 0..endowment, from `pgg_dist` (a JSON list) or `distribution` (the serving
    store's JSON object {"0": p, ..., "10": p}; a JSON list is accepted too)."""
    for col in ("pgg_dist", "distribution"):
        raw = row.get(col)
        if _is_missing(raw):
            continue
        try:
            data = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            raise EvaluationDataError(f"{what}: {col} is not JSON") from None
        if isinstance(data, Mapping):
            try:
                items = {int(k): float(v) for k, v in data.items()}
            except (TypeError, ValueError):
                raise EvaluationDataError(f"{what}: {col} keys must be whole contributions") from None
            if not items or min(items) < 0:
                raise EvaluationDataError(f"{what}: {col} has no contributions 0..endowment")
            return [items.get(k, 0.0) for k in range(max(items) + 1)]
        return [float(v) for v in data]
    raise EvaluationDataError(f"{what}: PGG row without a distribution (pgg_dist or distribution)")


def _prob(x, what: str) -> float:
    if _is_missing(x):
        raise EvaluationDataError(f"{what} is missing")
    v = float(x)
    if not -1e-9 <= v <= 1 + 1e-9:
        raise EvaluationDataError(f"{what} = {v} is not a probability")
    return min(max(v, 0.0), 1.0)


def _welch_from_stats(a: dict, b: dict) -> dict:
    """Welch's t-test from (mean, sd, n) per group: scipy for t and p, the Welch-Satterthwaite df. Undefined
    (t, df, p None, with a note) where a group has fewer than 2 values or both have zero spread."""
    undefined = {"difference": a["mean"] - b["mean"], "t": None, "df": None, "p_value": None}
    if a["sd"] is None or b["sd"] is None or min(a["n"], b["n"]) < 2:
        return undefined | {"note": "a role has fewer than 2 valid contributions: Welch's t-test undefined"}
    if not (a["sd"] or b["sd"]):
        return undefined | {"note": "both roles' contributions are all equal: Welch's t-test undefined"}
    res = stats.ttest_ind_from_stats(a["mean"], a["sd"], a["n"], b["mean"], b["sd"], b["n"], equal_var=False)
    va, vb = a["sd"] ** 2 / a["n"], b["sd"] ** 2 / b["n"]
    df = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1))
    t, p = float(res.statistic), float(res.pvalue)
    return {"difference": a["mean"] - b["mean"], "t": None if math.isnan(t) else t, "df": float(df),
            "p_value": None if math.isnan(p) else p}


# ------------------------------------------------------------------------------------------ assembly
def _strategy(results: list[ScenarioResult], choices, effective_n: int, n_resamples: int, seed: int):
    """Transfer, format, association and the placebo difference over these scenarios (`shared.transfer`); every
    scenario counts, by its information (low valid shares are weighted, never dropped)."""
    rows = [choices[r.id] for r in results if r.id in choices]
    return analyze_group(rows, floor_n=effective_n, n_resamples=n_resamples, seed=seed)


def _family_summary(name: str, all_results: list[ScenarioResult], n_resamples: int, choices=None,
                    effective_n: int = 300, seed: int = 0) -> FamilySummary:
    results = [r for r in all_results if not r.excluded]
    choices = choices or {}
    by = {kind: {} for kind in ("game", "context")}
    for kind in by:
        for k in dict.fromkeys(getattr(r, kind) for r in all_results):
            g = _strategy([r for r in all_results if getattr(r, kind) == k], choices, effective_n, n_resamples, seed)
            if g is not None:
                by[kind][k] = g
    return FamilySummary(
        strategy=_strategy(all_results, choices, effective_n, n_resamples, seed),
        strategy_by_game=by["game"], strategy_by_context=by["context"],
        low_valid=tuple(r.id for r in all_results if r.low_valid),
        excluded=tuple(r.id for r in all_results if r.excluded),
        family=name,
        scenarios=len(results),
        improvement=aggregate([r.improvement for r in results], n_resamples),
        by_game=group_by(results, "game", n_resamples),
        by_context=group_by(results, "context", n_resamples),
        classes=class_counts(results),
        unstable=tuple(r.id for r in results if r.unstable and r.improvement is not None),
        bridging=aggregate([r.bridging for r in results], n_resamples),
        js_base_teacher=aggregate([r.js_base_teacher for r in results], n_resamples),
        js_ft_teacher=aggregate([r.js_ft_teacher for r in results], n_resamples),
    )


def _rate_means(rates: list[RoleRate]) -> dict[str, dict[str, dict]]:
    """Per 2x2 family and role: mean rate over scenarios, and by game / by context (Fig. 2)."""
    out: dict[str, dict[str, dict]] = {}
    for fam in dict.fromkeys(r.family for r in rates if r.family != "pgg"):
        out[fam] = {}
        for role in ROLES:
            rr = [r for r in rates if r.family == fam and r.role == role]
            if not rr:
                continue
            d: dict = {"mean": _mean(r.rate for r in rr), "invalid_mean": _mean(r.invalid_rate for r in rr),
                       "valid_mean": _mean(r.valid_share for r in rr),
                       "count_mean": _mean(r.rate_count for r in rr),
                       "conditional_mean": _mean(r.rate_conditional for r in rr)}
            for kind in ("game", "context"):
                d[kind] = {k: _mean(r.rate for r in rr if getattr(r, kind) == k)
                           for k in dict.fromkeys(getattr(r, kind) for r in rr)}
                d[f"valid_{kind}"] = {k: _mean(r.valid_share for r in rr if getattr(r, kind) == k)
                                      for k in dict.fromkeys(getattr(r, kind) for r in rr)}
            out[fam][role] = d
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else None


def _assemble(estimator, samples, rates, results, table1, pgg, models, notes, n_resamples, *, rate_basis: str,
              min_valid_share: float, low_valid: set[str], protocol: str | None, choices=None, effective_n: int = 300,
              seed: int = 0) -> EvaluationResult:
    drop = rate_basis == "conditional"  # a low valid share is the conditional rate's (unstable) denominator
    results = [replace(r, low_valid=True, excluded=drop) if r.id in low_valid else r for r in results]
    if low_valid:
        ids = [r.id for r in results if r.low_valid]
        notes = list(notes) + [f"{len(ids)} scenario(s) with a role's valid share under {min_valid_share:g}"
                               + (", left out of the aggregates" if drop else " (kept: the count rate's denominator "
                                  "is N)") + f": {', '.join(ids)}"]
    roles = tuple(r for r in ROLES if any(x.role == r for x in rates))
    missing = [r for r in CORE_ROLES if r not in roles]
    if missing:
        notes = list(notes) + [f"role(s) not evaluated: {', '.join(missing)}; improvement, Table 1 and PGG "
                               f"tests need all three roles"]
    families = {}
    for fam in TWO_BY_TWO:
        rs = [r for r in results if r.family == fam]
        if rs:
            families[fam] = _family_summary(fam, rs, n_resamples, choices, effective_n, seed)
    extra = sorted({r.family for r in results} - set(TWO_BY_TWO) - {"pgg"})
    for fam in extra:
        families[fam] = _family_summary(fam, [r for r in results if r.family == fam], n_resamples, choices,
                                        effective_n, seed)
    overall = _family_summary("all", results, n_resamples, choices, effective_n, seed) if results else None
    unstable_ids = [r.id for r in results if r.unstable and r.improvement is not None]
    if unstable_ids:
        notes = list(notes) + [f"{len(unstable_ids)} unstable scenario(s) (teacher-base gap within sampling noise, "
                               f"their improvement divides by mostly noise): {', '.join(unstable_ids)}"]
    undefined = [r.id for r in results if r.improvement is None]
    if undefined:
        notes = list(notes) + [f"improvement undefined (teacher = base): {', '.join(undefined)}"]
    return EvaluationResult(
        estimator=estimator, samples=samples, roles=roles, models=dict(models), rates=tuple(rates),
        scenarios=tuple(results), families=families, overall=overall, rate_means=_rate_means(rates),
        table1=tuple(table1), table1_summary=table1_summary(table1) if table1 else {}, pgg=pgg,
        notes=tuple(notes), rate_basis=rate_basis, min_valid_share=min_valid_share, protocol=protocol,
    )


# The name the stages and `report` use: one entry point for samples, exact rows, or both.
compute = evaluate


__all__ = [
    "CLASSES", "EXACT_PARQUET", "EvaluationDataError", "EvaluationResult", "FamilySummary", "PggResult", "ROLES",
    "RoleRate", "compute", "evaluate", "evaluate_exact", "evaluate_samples", "metric_name", "read_exact", "read_samples",
]
