"""Synthetic evaluation results with known counts: for tests, demos of the report, and golden checks.

`paper_samples()` expands the paper's published in-sample counts (all three roles, 300 samples each) into a
samples table in the evaluate stage's schema, so the sampled metrics path must reproduce the paper's
headline numbers (mean improvement 46.26 %). The doubled-payoff games use the paper's Table 1 counts for the
fine-tuned student; everything the paper does not publish (teacher/base on doubled games, new contexts, the
public-goods game) is made up deterministically and clearly labelled as such.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
PAPER_COUNTS = REPO.parent / "shared" / "reference" / "paper-results" / "in_sample_cooperation_counts.csv"
TABLE1_COUNTS = REPO / "tests" / "data" / "table1_paper.csv"
ROLE_COLUMNS = {"student_base": "C_student_base", "student_finetuned": "C_student_finetuned", "teacher": "C_teacher"}
OOS_CONTEXTS = ("sports", "ventcap", "roomsharing")
GAMES = ("prison", "staghunt", "snowdrift", "delight")


def expand(groups: Iterable[Mapping], seed: int = 0, run_id: str = "synthetic") -> pd.DataFrame:
    """One row per sample from groups {role, scenario_id, family, context, game, n, and either `c` (C count)
    plus optional `invalid`, or `contributions` (PGG values; `invalid` more samples with no answer)}."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in groups:
        n, invalid = int(g["n"]), int(g.get("invalid", 0))
        if "contributions" in g:
            answers = [str(int(x)) for x in g["contributions"]] + [None] * invalid
        else:
            c = int(g["c"])
            answers = ["C"] * c + ["D"] * (n - invalid - c) + [None] * invalid
        if len(answers) != n:
            raise ValueError(f"{g['role']} {g['scenario_id']}: {len(answers)} answers for n = {n}")
        rng.shuffle(answers)
        for i, a in enumerate(answers):
            rows.append({
                "run_id": run_id, "role": g["role"], "model": g.get("model", f"{g['role']}-model"),
                "scenario_id": g["scenario_id"], "family": g["family"], "context": g["context"], "game": g["game"],
                "sample_index": i, "seed": seed + i, "messages": json.dumps([{"role": "user", "content": "..."}]),
                "response": a if a is not None else "I am not sure.", "answer": a, "valid": a is not None,
            })
    df = pd.DataFrame(rows)
    df["sample_index"] = df["sample_index"].astype("int64")
    df["valid"] = df["valid"].astype(bool)
    df["answer"] = df["answer"].astype(object)
    return df


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def paper_groups(n: int = 300, with_oos: bool = True, with_pgg: bool = True) -> list[dict]:
    """Count groups: the paper's in-sample counts (+ Table 1's doubled-game counts for the fine-tuned student
    and made-up teacher/base counts for doubled games, new contexts and the PGG)."""
    groups: list[dict] = []
    paper = _csv(PAPER_COUNTS)
    for row in paper:
        for role, col in ROLE_COLUMNS.items():
            groups.append({"role": role, "scenario_id": f"{row['context']}_{row['game']}", "family": "in_sample",
                           "context": row["context"], "game": row["game"], "n": n,
                           "c": round(int(row[col]) * n / int(row["samples"]))})
    if with_oos:
        doubled = {(r["context"], r["game"]): int(r["C_doubled"]) for r in _csv(TABLE1_COUNTS)}
        for row in paper:
            key = (row["context"], row["game"])
            made_up = {"student_base": int(row["C_student_base"]) - 5, "teacher": int(row["C_teacher"]) + 4,
                       "student_finetuned": doubled[key]}
            for role, c in made_up.items():
                groups.append({"role": role, "scenario_id": f"{key[0]}_{key[1]}_x2", "family": "oos_game",
                               "context": key[0], "game": key[1], "n": n, "c": round(c * n / 300)})
        for i, ctx in enumerate(OOS_CONTEXTS):
            for j, game in enumerate(GAMES):
                base, teacher = 250 - 3 * j, 120 + 15 * i + 10 * j
                ft = base - round((base - teacher) * (0.2 + 0.1 * i + 0.05 * j))  # 20..55 % of the gap
                for role, c, inv in (("student_base", base, 3), ("student_finetuned", ft, 1), ("teacher", teacher, 0)):
                    groups.append({"role": role, "scenario_id": f"{ctx}_{game}", "family": "oos_context",
                                   "context": ctx, "game": game, "n": n, "c": round(c * n / 300),
                                   "invalid": round(inv * n / 300)})
    if with_pgg:
        pattern = {"student_base": [2, 3, 4, 5, 3, 2], "student_finetuned": [4, 5, 6, 5, 7, 5],
                   "teacher": [6, 7, 8, 7, 6, 9]}
        for role, p in pattern.items():
            invalid = 2 if role == "student_base" else 0
            contributions = [p[i % len(p)] for i in range(n - invalid)]
            groups.append({"role": role, "scenario_id": "pgg", "family": "pgg", "context": "dormparty", "game": "pgg",
                           "n": n, "contributions": contributions, "invalid": invalid})
    return groups


def paper_samples(n: int = 300, seed: int = 0, **kw) -> pd.DataFrame:
    return expand(paper_groups(n, **kw), seed=seed)


def exact_from_groups(groups: Iterable[Mapping], endowment: int = 10) -> pd.DataFrame:
    """The exact-mode table whose probabilities equal the groups' frequencies (valid_mass = valid / n)."""
    rows = []
    for g in groups:
        n, invalid = int(g["n"]), int(g.get("invalid", 0))
        valid = n - invalid
        row = {"role": g["role"], "model": g.get("model", f"{g['role']}-model"), "scenario_id": g["scenario_id"],
               "family": g["family"], "context": g["context"], "game": g["game"], "valid_mass": valid / n,
               "p_C": None, "p_D": None, "pgg_dist": None}
        if "contributions" in g:
            h = np.bincount(np.asarray(g["contributions"], int), minlength=endowment + 1).astype(float)
            row["pgg_dist"] = json.dumps((h / h.sum()).tolist())
        else:
            row["p_C"], row["p_D"] = g["c"] / n, (valid - g["c"]) / n
        rows.append(row)
    return pd.DataFrame(rows)
