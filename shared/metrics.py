"""The paper's transfer metrics and the alignment figures its later notebooks used.

improvement = (C_ft - C_base) / (C_teacher - C_base) x 100 per scenario, in percent:
  < 0 exacerbation (moved away from the teacher), 0..100 partial, > 100 overcorrection,
  undefined where teacher == base (no gap to close).
Aggregates are over scenarios: mean, median, sample sd (ddof=1), se = sd/sqrt(n), min, max,
with a bootstrap 95 % CI (scipy.stats.bootstrap). A scenario is `unstable` when the
teacher-base gap is within sampling noise (two-proportion z-test, p >= alpha): its improvement
divides by a number that is mostly noise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon
from statsmodels.stats.proportion import proportions_ztest

CLASSES = ("exacerbation", "partial", "overcorrection", "undefined")


@dataclass(frozen=True)
class Counts:
    """Cooperation counts of one scenario for the three roles, out of `samples` each.

    `valid_*` is how many of the samples parsed (default: all). Rates use valid answers as the
    denominator, as the paper's counts do; invalid = samples - valid is reported, never dropped.
    """

    id: str
    samples: int
    c_base: int
    c_ft: int
    c_teacher: int
    valid_base: int | None = None
    valid_ft: int | None = None
    valid_teacher: int | None = None
    game: str = ""
    context: str = ""
    family: str = ""

    def __post_init__(self) -> None:
        if self.samples <= 0:
            raise ValueError(f"{self.id}: samples must be positive")
        for name in ("c_base", "c_ft", "c_teacher"):
            c, v = getattr(self, name), self._valid(name)
            if not 0 <= v <= self.samples:
                raise ValueError(f"{self.id}: valid count {v} outside 0..{self.samples}")
            if not 0 <= c <= v:
                raise ValueError(f"{self.id}: {name} = {c} is outside 0..{v}")

    def _valid(self, name: str) -> int:
        v = getattr(self, name.replace("c_", "valid_"))
        return self.samples if v is None else v

    def rate(self, role: str) -> float:
        name = {"base": "c_base", "ft": "c_ft", "teacher": "c_teacher"}[role]
        valid = self._valid(name)
        return getattr(self, name) / valid if valid else float("nan")


def improvement(p_base: float, p_ft: float, p_teacher: float) -> float | None:
    """Percent of the teacher-base gap the fine-tuned model closed; None where there is no gap."""
    gap = p_teacher - p_base
    if gap == 0 or any(map(math.isnan, (p_base, p_ft, p_teacher))):
        return None
    return (p_ft - p_base) / gap * 100.0


def classify(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "undefined"
    if value < 0:
        return "exacerbation"
    if value > 100:
        return "overcorrection"
    return "partial"


def bridging(p_base: float, p_ft: float, p_teacher: float) -> float | None:
    """(|p_base - p_teacher| - |p_ft - p_teacher|) / |p_base - p_teacher|: 1 = reached the teacher."""
    gap = abs(p_base - p_teacher)
    if gap == 0:
        return None
    return (gap - abs(p_ft - p_teacher)) / gap


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two answer distributions."""
    return float(jensenshannon(np.asarray(p, float), np.asarray(q, float), base=2) ** 2)


def binary_js(p_a: float, p_b: float) -> float:
    return js_divergence([p_a, 1 - p_a], [p_b, 1 - p_b])


def unstable(c_teacher: int, n_teacher: int, c_base: int, n_base: int, alpha: float = 0.05) -> bool:
    """True where the teacher-base difference is not distinguishable from sampling noise."""
    if c_teacher * n_base == c_base * n_teacher:
        return True
    _, p = proportions_ztest([c_teacher, c_base], [n_teacher, n_base])
    return bool(np.isnan(p) or p >= alpha)


def _bernoulli(count: int, n: int) -> np.ndarray:
    return np.r_[np.ones(count), np.zeros(n - count)]


def scenario_improvement_ci(
    counts: Counts, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Bootstrap CI of one scenario's improvement, resampling each role's answers independently.

    Resamples with no teacher-base gap have no improvement: where they are more than 5 % of the
    draws the interval is reported as None (the point estimate is too unstable to bound).
    """
    data = [_bernoulli(c, v) for c, v in ((counts.c_base, counts._valid("c_base")),
                                          (counts.c_ft, counts._valid("c_ft")),
                                          (counts.c_teacher, counts._valid("c_teacher")))]
    if any(len(d) < 2 for d in data):
        return None

    def stat(b, f, t, axis=-1):
        pb, pf, pt = b.mean(axis), f.mean(axis), t.mean(axis)
        gap = pt - pb
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap == 0, np.nan, (pf - pb) / gap * 100.0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN resamples (no gap) are handled below
        res = stats.bootstrap(
            data, stat, paired=False, vectorized=True, n_resamples=n_resamples, confidence_level=confidence,
            method="percentile", rng=np.random.default_rng(seed),
        )
    dist = res.bootstrap_distribution
    if np.isnan(dist).mean() > 0.05:
        return None
    lo, hi = np.nanpercentile(dist, [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Aggregate:
    n: int
    mean: float | None
    median: float | None
    sd: float | None
    se: float | None
    min: float | None
    max: float | None
    ci95: tuple[float, float] | None

    def to_dict(self) -> dict:
        return asdict(self)


def aggregate(values: Iterable[float | None], n_resamples: int = 2000, seed: int = 0) -> Aggregate:
    """Summary of defined values (None/NaN are left out and not counted in n)."""
    x = np.array([v for v in values if v is not None and not math.isnan(v)], float)
    n = len(x)
    if n == 0:
        return Aggregate(0, None, None, None, None, None, None, None)
    d = stats.describe(x, ddof=1) if n > 1 else None
    sd = float(math.sqrt(d.variance)) if d is not None else None
    se = float(stats.sem(x, ddof=1)) if n > 1 else None
    ci = None
    if n > 2 and np.ptp(x) > 0:
        # BCa where it is defined; with few or lumpy values it degenerates, then plain percentile.
        for method in ("BCa", "percentile"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = stats.bootstrap(
                    (x,), np.mean, n_resamples=n_resamples, confidence_level=0.95, method=method,
                    rng=np.random.default_rng(seed),
                )
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
            if not (math.isnan(lo) or math.isnan(hi)):
                ci = (lo, hi)
                break
    return Aggregate(
        n=n, mean=float(np.mean(x)), median=float(np.median(x)), sd=sd, se=se,
        min=float(x.min()), max=float(x.max()), ci95=ci,
    )


@dataclass(frozen=True)
class ScenarioResult:
    id: str
    game: str
    context: str
    family: str
    samples: int
    p_base: float
    p_ft: float
    p_teacher: float
    improvement: float | None
    cls: str
    unstable: bool
    ci95: tuple[float, float] | None
    bridging: float | None
    js_base_teacher: float
    js_ft_teacher: float
    low_valid: bool = False  # a role's valid share is under the evaluation's threshold
    excluded: bool = False  # left out of the aggregates (low valid share under the conditional rate)
    # the count-rate improvement split (they sum to it): the change of the valid share, the change of the choice
    improvement_format: float | None = None
    improvement_choice: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        return d


def scenario_result(c: Counts, n_resamples: int = 2000, seed: int = 0) -> ScenarioResult:
    pb, pf, pt = c.rate("base"), c.rate("ft"), c.rate("teacher")
    if c._valid("c_base") == c._valid("c_ft") == c._valid("c_teacher"):
        # Same denominators: compute from the integer counts, so -25 is -25.0 and not -25.00000000000008.
        imp = improvement(c.c_base, c.c_ft, c.c_teacher)
    else:
        imp = improvement(pb, pf, pt)
    return ScenarioResult(
        id=c.id, game=c.game, context=c.context, family=c.family, samples=c.samples,
        p_base=pb, p_ft=pf, p_teacher=pt, improvement=imp, cls=classify(imp),
        unstable=unstable(c.c_teacher, c._valid("c_teacher"), c.c_base, c._valid("c_base")),
        ci95=scenario_improvement_ci(c, n_resamples, seed=seed) if imp is not None else None,
        bridging=bridging(pb, pf, pt), js_base_teacher=binary_js(pb, pt), js_ft_teacher=binary_js(pf, pt),
    )


def group_by(results: Sequence[ScenarioResult], key: str, n_resamples: int = 2000) -> dict[str, Aggregate]:
    groups: dict[str, list[float | None]] = {}
    for r in results:
        groups.setdefault(getattr(r, key), []).append(r.improvement)
    return {k: aggregate(v, n_resamples) for k, v in groups.items()}


def class_counts(results: Sequence[ScenarioResult]) -> dict[str, int]:
    return {c: sum(r.cls == c for r in results) for c in CLASSES}
