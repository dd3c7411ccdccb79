"""Hypothesis tests: the paper's Table 1 (normal vs doubled payoffs) and the public-goods game.

Table 1 follows the paper's convention exactly, so its numbers reproduce:
  difference = p_doubled - p_normal, se = sqrt(p_normal (1 - p_normal) / n),
  z = (p_normal - p_doubled) / se, one-sided p = sf(|z|)
(a one-sample test of the doubled rate against the normal rate taken as known). Because both
rates are estimates, the `*_two_sample` fields add the textbook unpooled two-proportion Wald test:
se = sqrt(p1 q1 / n1 + p2 q2 / n2), z with the same sign convention, a two-sided p and a 95 % CI
of the difference (statsmodels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import confint_proportions_2indep

from shared.metrics import improvement


@dataclass(frozen=True)
class ZTestRow:
    id: str
    n_normal: int
    n_doubled: int
    p_normal: float
    p_doubled: float
    difference: float
    se: float | None
    z: float | None
    p_value: float | None
    se_two_sample: float | None
    z_two_sample: float | None
    p_two_sided: float | None
    ci95: tuple[float, float] | None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def stars(self) -> str:
        p = self.p_value
        if p is None:
            return ""
        return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def table1_ztest(sid: str, c_normal: int, n_normal: int, c_doubled: int, n_doubled: int) -> ZTestRow:
    p1, p2 = c_normal / n_normal, c_doubled / n_doubled
    se = math.sqrt(p1 * (1 - p1) / n_normal)
    z = (p1 - p2) / se if se > 0 else None
    p_value = float(stats.norm.sf(abs(z))) if z is not None else None
    se2 = math.sqrt(p1 * (1 - p1) / n_normal + p2 * (1 - p2) / n_doubled)
    z2 = (p1 - p2) / se2 if se2 > 0 else None
    p2s = float(2 * stats.norm.sf(abs(z2))) if z2 is not None else None
    ci = None
    if se2 > 0:
        lo, hi = confint_proportions_2indep(c_doubled, n_doubled, c_normal, n_normal, method="wald", compare="diff")
        ci = (float(lo), float(hi))
    return ZTestRow(
        id=sid, n_normal=n_normal, n_doubled=n_doubled, p_normal=p1, p_doubled=p2, difference=p2 - p1,
        se=se if se > 0 else None, z=z, p_value=p_value,
        se_two_sample=se2 if se2 > 0 else None, z_two_sample=z2, p_two_sided=p2s, ci95=ci,
    )


def table1_summary(rows: Sequence[ZTestRow]) -> dict[str, dict]:
    """The AVERAGE and MEDIAN lines of Table 1 (column-wise, over defined values)."""
    out: dict[str, dict] = {}
    for name, fn in (("average", np.mean), ("median", np.median)):
        line = {}
        for col in ("p_normal", "p_doubled", "difference", "se", "z", "p_value"):
            vals = [getattr(r, col) for r in rows if getattr(r, col) is not None]
            line[col] = float(fn(vals)) if vals else None
        out[name] = line
    return out


@dataclass(frozen=True)
class Moments:
    mean: float
    sd: float | None
    se: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def moments(x: Sequence[float]) -> Moments:
    a = np.asarray(x, float)
    n = len(a)
    if n == 0:
        raise ValueError("no contributions")
    sd = float(np.std(a, ddof=1)) if n > 1 else None
    return Moments(mean=float(a.mean()), sd=sd, se=float(stats.sem(a)) if n > 1 else None, n=n)


def welch(a: Sequence[float], b: Sequence[float]) -> dict:
    """Welch's unequal-variance t-test (two-sided) with the mean difference a - b."""
    res = stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False)
    t = float(res.statistic)
    return {
        "difference": float(np.mean(a) - np.mean(b)),
        "t": None if math.isnan(t) else t,
        "df": None if math.isnan(float(res.df)) else float(res.df),
        "p_value": None if math.isnan(float(res.pvalue)) else float(res.pvalue),
    }


PGG_ROLES = ("student_base", "student_finetuned", "teacher")


def pgg_analysis(contributions: dict[str, Sequence[float]]) -> dict:
    """Per-role moments, the improvement of the mean contribution and pairwise Welch tests."""
    missing = [r for r in PGG_ROLES if r not in contributions or len(contributions[r]) == 0]
    if missing:
        raise ValueError(f"no contributions for role(s): {', '.join(missing)}")
    roles = {r: moments(contributions[r]) for r in contributions}
    imp = improvement(roles["student_base"].mean, roles["student_finetuned"].mean, roles["teacher"].mean)
    tests = {}
    for a, b in (("student_finetuned", "student_base"), ("student_finetuned", "teacher"), ("teacher", "student_base")):
        if len(contributions[a]) > 1 and len(contributions[b]) > 1:
            tests[f"{a}_vs_{b}"] = welch(contributions[a], contributions[b])
    return {"roles": {r: m.to_dict() for r, m in roles.items()}, "improvement": imp, "tests": tests}
