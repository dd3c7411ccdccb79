"""Hypothesis tests: the paper's Table 1 (normal vs doubled payoffs) and the public-goods game.

Table 1 follows the paper's convention exactly, so its numbers reproduce:
  difference = p_doubled - p_normal, se = sqrt(p_normal (1 - p_normal) / n),
  z = (p_normal - p_doubled) / se, one-sided p = sf(|z|)
(a one-sample test of the doubled rate against the normal rate taken as known). Because both
rates are estimates, the `*_two_sample` fields add the textbook unpooled two-proportion Wald test:
se = sqrt(p1 q1 / n1 + p2 q2 / n2), z with the same sign convention, a two-sided p and a 95 % CI
of the difference (statsmodels).

Public-goods game: Welch's t-tests between roles; a role whose contributions are all equal (the paper's
teacher gave 7 every time) has zero variance - see `welch` for how that is reported (no scipy warning).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import confint_proportions_2indep

from tomtransfer.shared.metrics import improvement


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


def welch(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("a", "b")) -> dict:
    """Welch's unequal-variance t-test (two-sided) with the mean difference a - b.

    Returns {difference, t, df, p_value, method, note}. A group whose values are all equal has zero sample
    variance, where scipy's moment calculation warns about catastrophic cancellation; such groups are handled
    here without scipy's warning:
    * one group constant (say a = c every time), the other varying: Welch's t with s_a = 0 is exactly the
      one-sample t-test of b against c (t = (c - mean b) / (s_b / sqrt(n_b)), df = n_b - 1), so that is what
      is computed (`method` "one_sample"); it treats c as known, the note says so;
    * both constant: t, df and p are undefined (None), `method` None, and the note says why;
    * fewer than 2 values in a group: undefined as well.
    Any other numerical warning from scipy (nearly identical values) is turned into the note, not printed.
    """
    xa, xb = np.asarray(a, float), np.asarray(b, float)
    out: dict = {"difference": float(np.mean(xa) - np.mean(xb)), "t": None, "df": None, "p_value": None,
                 "method": None, "note": None}
    short = [n for n, x in zip(names, (xa, xb)) if len(x) < 2]
    if short:
        out["note"] = f"{', '.join(short)}: fewer than 2 contributions, Welch's t-test undefined"
        return out
    const = {n: float(x[0]) for n, x in zip(names, (xa, xb)) if np.ptp(x) == 0}
    caught: list[warnings.WarningMessage] = []
    if len(const) == 2:
        out["note"] = (" and ".join(f"{n}: all contributions equal ({_g(c)})" for n, c in const.items())
                       + ", Welch's t-test undefined")
        return out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if const:
            (cname, c), = const.items()
            other, x, sign = (names[1], xb, -1.0) if cname == names[0] else (names[0], xa, 1.0)
            res = stats.ttest_1samp(x, popmean=c)
            t, df, p = sign * float(res.statistic), float(len(x) - 1), float(res.pvalue)
            out["method"] = "one_sample"
            out["note"] = (f"{cname}: all contributions equal ({_g(c)}); Welch's t with zero variance is the "
                           f"one-sample t-test of {other} against {_g(c)} (df = {len(x) - 1}), treating {_g(c)} "
                           f"as exact")
        else:
            res = stats.ttest_ind(xa, xb, equal_var=False)
            t, df, p = float(res.statistic), float(res.df), float(res.pvalue)
            out["method"] = "welch"
    messages = sorted({str(w.message).split(".")[0] for w in caught})
    if messages:
        extra = "scipy: " + "; ".join(messages) + " (result may be unreliable)"
        out["note"] = f"{out['note']}; {extra}" if out["note"] else extra
    out["t"] = None if math.isnan(t) else t
    out["df"] = None if math.isnan(df) else df
    out["p_value"] = None if math.isnan(p) else p
    return out


def _g(x: float) -> str:
    return f"{x:g}" if x != int(x) else f"{x:.1f}"


PGG_ROLES = ("student_base", "student_finetuned", "teacher")


def pgg_analysis(contributions: dict[str, Sequence[float]]) -> dict:
    """Per-role moments, the improvement of the mean contribution, pairwise Welch tests and the tests' notes
    (zero-variance groups, see `welch`)."""
    missing = [r for r in PGG_ROLES if r not in contributions or len(contributions[r]) == 0]
    if missing:
        raise ValueError(f"no contributions for role(s): {', '.join(missing)}")
    roles = {r: moments(contributions[r]) for r in contributions}
    imp = improvement(roles["student_base"].mean, roles["student_finetuned"].mean, roles["teacher"].mean)
    tests = {}
    for a, b in (("student_finetuned", "student_base"), ("student_finetuned", "teacher"), ("teacher", "student_base")):
        if len(contributions[a]) > 1 and len(contributions[b]) > 1:
            tests[f"{a}_vs_{b}"] = welch(contributions[a], contributions[b], names=(a, b))
    notes = list(dict.fromkeys(t["note"] for t in tests.values() if t["note"]))
    return {"roles": {r: m.to_dict() for r, m in roles.items()}, "improvement": imp, "tests": tests, "notes": notes}
