"""Strategy, not format: how far a student's *choice among valid answers* moved toward its teacher's.

Why this exists. The paper's improvement uses the count rate C/N, where an invalid answer counts as "not C".
For 7B students that answer validly that is the choice; for students that mostly do not answer, C/N moves with the
valid share: a student that only learned to *answer* scores like one that learned the teacher's strategy. So every
role's answer on a scenario is split into two numbers, each with its own measurement noise:

    s  = P(valid answer)                       the format
    q  = P(C | valid answer)                   the choice (the conditional rate)

and the count rate is their product, p = s * q. Per scenario the paper's improvement splits exactly into a format
part and a choice part (`split_improvement`):

    p_ft - p_base = (s_ft - s_base) * q_base  +  s_ft * (q_ft - q_base)

Transfer (per family, game or context; the strategic number the product leads with)
------------------------------------------------------------------------------------
The fine-tuned student's choice change regressed on the teacher-base choice gap, across scenarios, in percent:

    x_s = q_teacher - q_base,   y_s = q_ft - q_base
    transfer = 100 * sum_s w_s (x_s y_s - v_base,s) / sum_s w_s (x_s^2 - v_teacher,s - v_base,s)

- 100: the student's choices moved all the way to the teacher's, scenario by scenario; 0: they did not move toward
  it (a format-only student, whatever its valid share); < 0: they moved away. A student that moved toward the
  teacher's *average* only (a constant choice) scores by how much of the gaps that average covers.
- It is the paper's per-scenario improvement (y/x) averaged with weights w_s x_s^2: a scenario counts by how much
  it can say. It never divides by one scenario's gap, so a scenario with a tiny gap cannot blow it up.
- Few valid answers: w_s = 1 / (v_ft + v_base + v_floor), the inverse sampling variance of y_s, so a scenario with
  15 valid answers weighs a twentieth of one with 300 and a scenario where a student gave no valid answer weighs 0
  (never "everything dropped": the estimate uses what information there is). v_floor = 0.25 / n_eff (n_eff = the
  effective n of exact roles, 300 by default) caps the weight of noise-free (exact-mode) roles at that of 300 samples.
- Noise correction: sampling noise in q_base appears in both x and y and would make a format-only student look like
  it transferred (E[x y] = X Y + v_base); noise in q_teacher and q_base inflates x^2 (E[x^2] = X^2 + v_teacher +
  v_base). Both are subtracted (errors-in-variables correction), with v from Jeffreys-smoothed proportions.
  Where the corrected denominator is not positive the teacher and base choose alike within noise: transfer is
  undefined (None, with a note), never a huge number.
- The CI is a two-level percentile bootstrap: scenarios resampled with replacement (the scenarios are a sample
  of situations), and every role's answers redrawn from its measured distribution (counts: multinomial over
  C / D / invalid; exact: fixed, no sampling noise; mixture: the sampled remainder redrawn). Weights and noise
  corrections stay those of the point estimate.

Also here: `format` (the change of the valid share, percentage points), `association` (the weighted Pearson
correlation across scenarios between a role's choice and the teacher's: does it follow *which* scenarios the
teacher cooperates in; attenuated by noise, reported for base and fine-tuned side by side) and the placebo
difference transfer(fine-tuned) - transfer(placebo) with a paired bootstrap CI.

Limits: q is P(C | valid) of a binary choice (2x2 games); the public-goods game's choice is an amount and is
handled by the evaluator (improvement of the mean of valid contributions). With a handful of scenarios the
scenario bootstrap is coarse (n is reported).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import chi2

TEACHER, BASE, FINETUNED, PLACEBO = "teacher", "student_base", "student_finetuned", "student_placebo"
STUDENTS = (FINETUNED, PLACEBO)


# ------------------------------------------------------------------------------------------ one measured choice
@dataclass(frozen=True)
class Choice:
    """One role's answers on one scenario and how they were measured.

    kind "counts": c / d / invalid answers out of n samples. kind "exact": probabilities p_c, p_d of a valid
    answer (the rest invalid), no sampling noise. kind "mixture": exact probabilities p_c, p_d that the answer
    *leads* with C / D, plus counts c / d / invalid of sampled answers that do not lead with a letter, which
    estimate how the remaining mass 1 - p_c - p_d answers (P(C) = p_c + (1 - p_c - p_d) * c / (c + d + invalid)).
    """

    kind: str
    c: float = 0.0
    d: float = 0.0
    invalid: float = 0.0
    p_c: float = 0.0
    p_d: float = 0.0

    @classmethod
    def counts(cls, c: int, d: int, invalid: int) -> "Choice":
        if min(c, d, invalid) < 0 or c + d + invalid <= 0:
            raise ValueError(f"counts must be >= 0 with a positive total, got C={c} D={d} invalid={invalid}")
        return cls("counts", c=float(c), d=float(d), invalid=float(invalid))

    @classmethod
    def exact(cls, p_c: float, p_d: float) -> "Choice":
        _check_probs(p_c, p_d)
        return cls("exact", p_c=float(p_c), p_d=float(p_d))

    @classmethod
    def mixture(cls, lead_c: float, lead_d: float, tail_c: int, tail_d: int, tail_invalid: int) -> "Choice":
        _check_probs(lead_c, lead_d)
        if min(tail_c, tail_d, tail_invalid) < 0:
            raise ValueError("tail counts must be >= 0")
        return cls("mixture", c=float(tail_c), d=float(tail_d), invalid=float(tail_invalid), p_c=float(lead_c),
                   p_d=float(lead_d))

    @property
    def _n(self) -> float:
        return self.c + self.d + self.invalid

    def probs(self) -> tuple[float, float]:
        """(P(C), P(D)); the rest is the invalid probability."""
        if self.kind == "counts":
            return self.c / self._n, self.d / self._n
        if self.kind == "exact":
            return self.p_c, self.p_d
        rest = max(1.0 - self.p_c - self.p_d, 0.0)
        if self._n == 0:  # no sampled answer without a leading letter: the remainder's answers are unknown
            return self.p_c, self.p_d
        return self.p_c + rest * self.c / self._n, self.p_d + rest * self.d / self._n

    @property
    def share(self) -> float:
        """P(valid answer)."""
        pc, pd = self.probs()
        return pc + pd

    @property
    def q(self) -> float | None:
        """P(C | valid answer); None where no valid answer was seen."""
        pc, pd = self.probs()
        return pc / (pc + pd) if pc + pd > 0 else None

    def variance(self) -> float:
        """Sampling variance of the estimate of q (0 for exact; inf where no valid answer was seen).

        Proportions are Jeffreys-smoothed ((k + 1/2) / (n + 1)), so 3 C out of 3 valid is not "certain"."""
        if self.kind == "exact":
            return 0.0
        if self.kind == "counts":
            valid = self.c + self.d
            if valid == 0:
                return math.inf
            qs = (self.c + 0.5) / (valid + 1)
            return qs * (1 - qs) / valid
        n = self._n
        rest = max(1.0 - self.p_c - self.p_d, 0.0)
        if n == 0 or rest == 0:
            return 0.0
        tc, td = (self.c + 1 / 3) / (n + 1), (self.d + 1 / 3) / (n + 1)
        var_c, var_d, cov = tc * (1 - tc) / n, td * (1 - td) / n, -tc * td / n
        pc, pd = self.p_c + rest * tc, self.p_d + rest * td
        v = pc + pd
        if v <= 0:
            return math.inf
        # delta method: q = pc / (pc + pd), pc and pd linear in the tail proportions
        gc, gd = rest * pd / v ** 2, -rest * pc / v ** 2
        return gc * gc * var_c + gd * gd * var_d + 2 * gc * gd * cov

    def effective_valid(self) -> float:
        """How many valid answers the estimate of q is worth (inf for exact; a mixture by its variance)."""
        if self.kind == "counts":
            return self.c + self.d
        if self.kind == "exact":
            return math.inf
        v, q = self.variance(), self.q
        if q is None:
            return 0.0
        return math.inf if v == 0 else max(q * (1 - q), 1e-6) / v

    def draw(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """`size` bootstrap draws of (P(C), P(D)) as this measurement would have seen them."""
        if self.kind == "exact" or (self.kind == "mixture" and self._n == 0):
            pc, pd = self.probs()
            return np.full(size, pc), np.full(size, pd)
        n = int(round(self._n))
        k = rng.multinomial(n, np.array([self.c, self.d, self.invalid]) / self._n, size=size)
        if self.kind == "counts":
            return k[:, 0] / n, k[:, 1] / n
        rest = max(1.0 - self.p_c - self.p_d, 0.0)
        return self.p_c + rest * k[:, 0] / n, self.p_d + rest * k[:, 1] / n


def _check_probs(p_c: float, p_d: float) -> None:
    if not (0 <= p_c <= 1 + 1e-9 and 0 <= p_d <= 1 + 1e-9 and p_c + p_d <= 1 + 1e-6):
        raise ValueError(f"probabilities out of range: p_C={p_c} p_D={p_d}")


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap 95 % CI over n scenarios (mean None: undefined, see `note`)."""

    mean: float | None
    ci95: tuple[float, float] | None
    n: int
    note: str | None = None

    def to_dict(self) -> dict:
        d = {"mean": self.mean, "ci95": list(self.ci95) if self.ci95 else None, "n": self.n}
        if self.note:
            d["note"] = self.note
        return d

    @property
    def excludes_zero(self) -> bool:
        return self.ci95 is not None and (self.ci95[0] > 0 or self.ci95[1] < 0)


@dataclass(frozen=True)
class GroupTransfer:
    """The strategic and format numbers of one group of 2x2 scenarios (a family, a game, a context)."""

    scenarios: int
    transfer: dict[str, Estimate]  # student role -> transfer in percent
    format: dict[str, Estimate]  # student role -> change of the valid share vs the base, percentage points
    association: dict[str, Estimate]  # role (base, students) -> weighted Pearson r with the teacher's choice
    association_gain: Estimate | None  # r(fine-tuned) - r(base)
    placebo_difference: Estimate | None  # transfer(fine-tuned) - transfer(placebo)
    valid_share: dict[str, float]  # role -> mean valid share over the group's scenarios

    def to_dict(self) -> dict:
        return {
            "scenarios": self.scenarios,
            "transfer": {k: v.to_dict() for k, v in self.transfer.items()},
            "format": {k: v.to_dict() for k, v in self.format.items()},
            "association": {k: v.to_dict() for k, v in self.association.items()},
            "association_gain": self.association_gain.to_dict() if self.association_gain else None,
            "placebo_difference": self.placebo_difference.to_dict() if self.placebo_difference else None,
            "valid_share": dict(self.valid_share),
        }


def split_improvement(base: Choice, ft: Choice, teacher: Choice) -> tuple[float | None, float | None]:
    """The paper's count-rate improvement of one scenario as (format part, choice part), in percent; they sum to
    it. (None, None) where it is undefined (no teacher-base gap in the count rate)."""
    sb, sf = base.share, ft.share
    pb, pf, pt = base.probs()[0], ft.probs()[0], teacher.probs()[0]
    gap = pt - pb
    if gap == 0 or base.q is None:
        return None, None
    qf = ft.q if ft.q is not None else base.q
    return 100 * (sf - sb) * base.q / gap, 100 * sf * (qf - base.q) / gap


# ------------------------------------------------------------------------------------------ the estimator
def analyze_group(rows: Sequence[Mapping[str, Choice]], *, floor_n: int = 300, n_resamples: int = 2000,
                  seed: int = 0) -> GroupTransfer | None:
    """Transfer, format, association and the placebo difference over scenarios (one mapping role -> Choice each;
    a scenario needs the teacher, the base and at least one student). None when no scenario qualifies."""
    rows = [r for r in rows if TEACHER in r and BASE in r and any(s in r for s in STUDENTS)]
    if not rows:
        return None
    students = [s for s in STUDENTS if all(s in r for r in rows)]
    roles = [TEACHER, BASE, *students]
    S, B = len(rows), n_resamples
    rng = np.random.default_rng(seed)
    floor = 0.25 / max(floor_n, 1)

    # point values and their noise; each role's choices shrunk toward its own mean over the group (empirical Bayes)
    raw = {ro: np.array([_nan(r[ro].q) for r in rows]) for ro in roles}
    share = {ro: np.array([r[ro].share for r in rows]) for ro in roles}
    neff = {ro: np.array([r[ro].effective_valid() for r in rows]) for ro in roles}
    lam, var0, q = {}, {}, {}
    for ro in roles:
        lam[ro], var0[ro] = _shrinkage(raw[ro], neff[ro])
        q[ro] = _shrink(raw[ro], var0[ro], lam[ro])
    # the sampling variance of each estimate, at the shrunk choice (not at a 0/15 or 15/15 observed one)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = {ro: np.where(neff[ro] > 0, np.clip(q[ro] * (1 - q[ro]), 0.01, None) / neff[ro], np.inf)
               for ro in roles}
    post = {ro: np.where(np.isfinite(var[ro]), lam[ro] * np.where(np.isfinite(var[ro]), var[ro], 0.0), 0.0)
            for ro in roles}  # posterior variance

    # bootstrap: scenario indices, then each role's answers redrawn per scenario
    idx = rng.integers(0, S, size=(B, S))
    q_b, raw_b, s_b = {}, {}, {}
    for ro in roles:
        pc = np.empty((B, S))
        pd = np.empty((B, S))
        for j, r in enumerate(rows):
            pc[:, j], pd[:, j] = r[ro].draw(rng, B)
        v = pc + pd
        with np.errstate(invalid="ignore", divide="ignore"):
            qq = np.where(v > 0, pc / np.where(v > 0, v, 1), np.nan)
        raw_b[ro] = np.take_along_axis(qq, idx, axis=1)
        q_b[ro] = _shrink(raw_b[ro], var0[ro][idx], lam[ro][idx])
        s_b[ro] = np.take_along_axis(v, idx, axis=1)

    transfer, fmt, assoc = {}, {}, {}
    stats_b: dict[str, np.ndarray] = {}
    for st in students:
        w = _weights(var[st], var[BASE], floor)
        point = _transfer(q[TEACHER], q[BASE], q[st], post[TEACHER], post[BASE], w)
        boot = _transfer(q_b[TEACHER], q_b[BASE], q_b[st], post[TEACHER][idx], post[BASE][idx], w[idx])
        stats_b[st] = boot
        n = int(np.sum((w > 0) & np.isfinite(raw[TEACHER]) & np.isfinite(raw[BASE]) & np.isfinite(raw[st])))
        note = None if point is not None else ("no teacher-base difference in choice beyond sampling noise: "
                                               "nothing to transfer")
        transfer[st] = Estimate(point, _ci(boot) if point is not None else None, n, note)
        dfmt = 100 * (share[st] - share[BASE])
        fmt[st] = Estimate(float(np.mean(dfmt)), _ci(100 * np.mean(s_b[st] - s_b[BASE], axis=1)), S)
    for ro in [BASE, *students]:
        w = _weights(var[ro], var[TEACHER], floor)
        point = _corr(raw[ro], raw[TEACHER], w)
        boot = _corr(raw_b[ro], raw_b[TEACHER], w[idx])
        stats_b[f"r.{ro}"] = boot
        n = int(np.sum((w > 0) & np.isfinite(raw[ro]) & np.isfinite(raw[TEACHER])))
        assoc[ro] = Estimate(point, _ci(boot) if point is not None else None, n,
                             None if point is not None else "no spread in a role's choice across these scenarios")
    gain = None
    if FINETUNED in students and assoc[FINETUNED].mean is not None and assoc[BASE].mean is not None:
        gain = Estimate(assoc[FINETUNED].mean - assoc[BASE].mean,
                        _ci(stats_b[f"r.{FINETUNED}"] - stats_b[f"r.{BASE}"]), S)
    placebo = None
    if FINETUNED in students and PLACEBO in students:
        a, b = transfer[FINETUNED].mean, transfer[PLACEBO].mean
        if a is not None and b is not None:
            placebo = Estimate(a - b, _ci(stats_b[FINETUNED] - stats_b[PLACEBO]), S)
    return GroupTransfer(
        scenarios=S, transfer=transfer, format=fmt, association=assoc, association_gain=gain,
        placebo_difference=placebo, valid_share={ro: float(np.mean(share[ro])) for ro in roles},
    )


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _shrinkage(q: np.ndarray, neff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lambda_s, v0_s): lambda_s = tau^2 / (tau^2 + v0_s), how much of scenario s's own estimate survives
    shrinkage toward the role's mean (1 where it is noise-free, 0 where nothing was seen); v0_s = m (1 - m) / neff_s,
    the noise of the estimate were the role's choice the same everywhere (m its pooled choice). tau^2, the spread
    of the role's true choices across scenarios, by the method of moments (observed variance minus mean noise,
    floored at 0), and 0 where Cochran's Q test finds no differences beyond noise (p > 0.05): a noisy base with
    no real differences would otherwise leak its noise into both sides of the regression."""
    ok = np.isfinite(q) & (neff > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        fin = ok & np.isfinite(neff)
        m = float(np.sum(neff[fin] * q[fin]) / np.sum(neff[fin])) if fin.any() else float(np.nanmean(q[ok] if ok.any() else [0.5]))
        v0 = np.where(ok, max(m * (1 - m), 0.01) / neff, np.inf)
    if ok.sum() < 2:
        return np.where(ok, 1.0, 0.0), v0
    tau2 = max(float(np.var(q[ok], ddof=1) - np.mean(v0[ok])), 0.0)
    noisy = ok & (v0 > 0)
    if noisy.sum() >= 2 and noisy.sum() == ok.sum():
        w = 1.0 / v0[noisy]
        mw = np.sum(w * q[noisy]) / np.sum(w)
        if chi2.sf(float(np.sum(w * (q[noisy] - mw) ** 2)), noisy.sum() - 1) > 0.05:
            tau2 = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        lam = np.where(v0 == 0, 1.0, tau2 / (tau2 + v0))
    return np.where(ok, np.nan_to_num(lam, nan=0.0), 0.0), v0


def _shrink(q: np.ndarray, v: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """q shrunk toward the role's precision-weighted mean over the last axis: m + lambda (q - m); where nothing
    was seen (q undefined) the mean itself."""
    ok = np.isfinite(q)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(ok & np.isfinite(v), 1.0 / (v + 1e-4), 0.0)
        m = (p * np.where(ok, q, 0.0)).sum(axis=-1, keepdims=True) / p.sum(axis=-1, keepdims=True)
    return np.where(ok, m + lam * (np.where(ok, q, 0.0) - m), m)


def _weights(v_student: np.ndarray, v_base: np.ndarray, floor: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        w = 1.0 / (v_student + v_base + floor)
    return np.where(np.isfinite(w), w, 0.0)


def _transfer(qt, qb, qs, vt, vb, w):
    """The estimator of the module docstring over the last axis (works for the point and for the bootstrap)."""
    x, y = qt - qb, qs - qb
    ok = np.isfinite(x) & np.isfinite(y) & (w > 0)
    num = np.where(ok, w * (x * y - vb), 0.0).sum(axis=-1)
    den = np.where(ok, w * (x * x - vt - vb), 0.0).sum(axis=-1)
    # a corrected denominator under 1 % of the uncorrected one is noise: no gap to transfer
    raw = np.where(ok, w * x * x, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0.01 * raw, 100.0 * num / np.where(den == 0, 1, den), np.nan)
    if np.ndim(out) == 0:
        return None if not np.isfinite(out) or raw == 0 else float(out)
    return out


def _corr(a, t, w):
    ok = np.isfinite(a) & np.isfinite(t) & (w > 0)
    ww = np.where(ok, w, 0.0)
    a0, t0 = np.where(ok, a, 0.0), np.where(ok, t, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sw = ww.sum(axis=-1, keepdims=True)
        ma, mt = (ww * a0).sum(axis=-1, keepdims=True) / sw, (ww * t0).sum(axis=-1, keepdims=True) / sw
        da, dt = np.where(ok, a0 - ma, 0.0), np.where(ok, t0 - mt, 0.0)
        cov = (ww * da * dt).sum(axis=-1)
        den = np.sqrt((ww * da * da).sum(axis=-1) * (ww * dt * dt).sum(axis=-1))
        r = np.where((den > 1e-12) & (ok.sum(axis=-1) >= 3), cov / np.where(den > 0, den, 1), np.nan)
    if np.ndim(r) == 0:
        return None if not np.isfinite(r) else float(r)
    return r


def _ci(values: np.ndarray) -> tuple[float, float] | None:
    """Percentile 95 % interval of the defined bootstrap values; None where over 5 % are undefined."""
    v = np.asarray(values, float)
    finite = v[np.isfinite(v)]
    if len(finite) < 0.95 * len(v) or len(finite) < 20:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def mean_transfer(values: Mapping[str, Sequence[float] | float], *, n_resamples: int = 2000,
                  seed: int = 0) -> tuple[dict[str, Estimate], Estimate | None]:
    """The public-goods game's transfer: the improvement of the mean *valid* contribution (format-free by
    construction), 100 (m_student - m_base) / (m_teacher - m_base), per student role, with a percentile bootstrap CI
    that redraws each sampled role's valid contributions (a float is an exact role's noise-free mean); and the
    placebo difference. The CI is undefined (None) where over 5 % of the draws reverse the teacher-base gap: it
    would be unbounded; and where a sampled role it depends on has a single valid contribution (its resamples are all
    that one value, so the bootstrap would show no spread where nothing about the spread is known)."""
    if TEACHER not in values or BASE not in values:
        return {}, None
    rng = np.random.default_rng(seed)
    draws: dict[str, np.ndarray] = {}
    point: dict[str, float] = {}
    single: set[str] = set()  # sampled roles with one valid contribution
    for role, v in values.items():
        if isinstance(v, (int, float)):
            point[role] = float(v)
            draws[role] = np.full(n_resamples, float(v))
            continue
        x = np.asarray(v, float)
        if len(x) == 0:
            continue
        if len(x) == 1:
            single.add(role)
        point[role] = float(x.mean())
        draws[role] = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    if TEACHER not in point or BASE not in point:
        return {}, None
    out: dict[str, Estimate] = {}
    boots: dict[str, np.ndarray] = {}
    gap = point[TEACHER] - point[BASE]
    gap_b = draws[TEACHER] - draws[BASE]
    for st in STUDENTS:
        if st not in point:
            continue
        if gap == 0:
            out[st] = Estimate(None, None, 1, "teacher and base give the same mean: nothing to transfer")
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(np.sign(gap_b) == np.sign(gap), 100 * (draws[st] - draws[BASE]) / gap_b, np.nan)
        boots[st] = b
        lone = sorted(single & {TEACHER, BASE, st})
        note = f"one valid contribution from {', '.join(lone)}: no CI" if lone else None
        out[st] = Estimate(100 * (point[st] - point[BASE]) / gap, None if lone else _ci(b), 1, note)
    placebo = None
    if FINETUNED in boots and PLACEBO in boots:
        lone = sorted(single & {TEACHER, BASE, FINETUNED, PLACEBO})
        placebo = Estimate(out[FINETUNED].mean - out[PLACEBO].mean,
                           None if lone else _ci(boots[FINETUNED] - boots[PLACEBO]), 1,
                           f"one valid contribution from {', '.join(lone)}: no CI" if lone else None)
    return out, placebo


def verdict(t: Estimate | None, format_pp: float | None = None, placebo_difference: Estimate | None = None) -> str:
    """Words for the fine-tuned student's transfer, read with its format change and, where a placebo was trained,
    the paired difference transfer(real) - transfer(placebo).

    A transfer CI above 0 says the choice moved toward the teacher's; only the placebo says whether that is the
    teacher's *scenario-by-scenario* strategy or a shift any fine-tuning on these prompts gives (the placebo learns the
    same answers moved to other scenarios, so it learns the teacher's average choice too). So with a placebo, "shown"
    needs both CIs above 0."""
    if t is None or t.mean is None:
        return "undefined" + (f" ({t.note})" if t is not None and t.note else "")
    if t.ci95 is None:
        return "CI undefined"
    pd_ = placebo_difference if placebo_difference is not None and placebo_difference.ci95 is not None else None
    if t.ci95[0] > 0:
        if pd_ is None:
            return "strategic transfer shown"
        if pd_.ci95[0] > 0:
            return "strategic transfer shown, above the placebo"
        if pd_.ci95[1] < 0:
            return "moved toward the teacher, less than the placebo: not the teacher's strategy"
        return "moved toward the teacher, no more than the placebo: its average choice, not its strategy"
    if t.ci95[1] < 0:
        return "moved away from the teacher"
    if pd_ is not None and pd_.ci95[0] > 0:  # the placebo moved away, the student did not: no transfer on its own
        return "no strategic transfer shown (CI includes 0), though above the placebo"
    if format_pp is not None and format_pp <= 0:
        return "no strategic transfer shown: the CI includes 0"
    return "no strategic transfer shown: the gain is format"
