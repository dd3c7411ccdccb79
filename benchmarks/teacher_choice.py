"""Which teacher to distil: how much each model's choice depends on the GAME within a context, and on the CONTEXT
within a game, measured in exact mode (issue 22 item 3).

What is measured. Every available model (the two teacher candidates Qwen2.5-Coder-0.5B/1.5B-Instruct and the
students SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct, which is one model with two roles: measured once)
on all 53 scenarios under both instructions (answer_only, answer_motivation), at `sampling.temperature` of
`configs/demo.yaml` (0.8): one exact call each through the product's engine (`TransformersEngine.exact`, the code
behind `/v1/exact`, called directly: no Ray), which gives p_C and p_D, the probabilities that the response *leads*
with C / D (one prefill of the chat-templated prompt + a few batched expansion steps, no sampling noise). From them:

- valid (leading) mass s = p_C + p_D, and the choice among valid answers q = P(C | valid) = p_C / s;
- by game: mean q over the contexts of a scope (in_sample: the 5 canonical contexts; all_2x2: in-sample, new
  contexts and doubled payoffs, 13 context blocks of 4 games each);
- the GAME effect within a context: per block, q(delight) - q(prison) (Prisoner's Delight, where C dominates, vs the
  Prisoner's Dilemma, where D does) and q(staghunt) - q(snowdrift); the mean over blocks with a percentile bootstrap
  CI over blocks (`--boot` resamples, `--seed`); a model that reads the payoffs should give delight - prison > 0;
- the CONTEXT effect within a game: per game, the range (max - min) and SD of q across contexts; and the range of
  the per-context means (mean over the 4 games);
- a two-way decomposition over the 20 in-sample scenarios (5 contexts x 4 games, no interaction term): the shares
  of the variance of q across scenarios that the game and the context main effects explain, and the rest;
- doubled payoffs: q(x2) - q(x1) per (context, game), mean with a bootstrap CI over contexts;
- the public-goods game: its valid mass (a leading whole amount) and mean contribution among valid answers;
- per (teacher instruction, teacher, student) pair on the 20 in-sample scenarios (the student under answer_only, as
  the paper's protocol evaluates it): the teacher-student gap q_T - q_S per scenario (its mean, its SD across
  scenarios: what transfer regresses on), the shares of that gap's variance by game and by context, and the
  correlation of q_T and q_S. A gap that varies only by context can teach a context -> choice mapping, never a
  game-level strategy.

Limits. Exact mode reads the *leading* answer only. Under answer_motivation a model that reasons before answering
has a small valid mass here, and its q describes only the responses that start with a letter; the evaluator and the
soft labels add the teacher's sampled remainder for the rest (`shared.transfer.Choice.mixture`). `--samples K`
measures that remainder too: K motivated samples per in-sample scenario (max_tokens `--sample-max-tokens`, default
the demo's `sampling.max_tokens`), parsed with the full rule, for the teacher candidates, combined as the evaluator
combines them.

Reproducible: exact mode is deterministic; samples use fixed seeds (`--seed` + scenario index); the bootstrap is
seeded. One model is loaded at a time (1.5B fp32 is ~7 GB). Raw rows and the analysis go to `--out`
(benchmarks/results/teacher_choice.json); `--reuse` keeps the rows of (model, instruction) pairs already in it that
were measured with the same settings and measures only what is missing; `--analyze-only` recomputes the analysis.

Run: `.venv/bin/python -m benchmarks.teacher_choice [--models a,b] [--samples 0] [--threads 2] [--reuse]`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
OUT = ROOT / "benchmarks" / "results" / "teacher_choice.json"
MODELS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct"]
TEACHERS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
STUDENTS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
INSTRUCTIONS = ["answer_only", "answer_motivation"]
GAMES = ["prison", "staghunt", "snowdrift", "delight"]
EFFECTS = {"delight-prison": ("delight", "prison"), "staghunt-snowdrift": ("staghunt", "snowdrift")}
SCOPES = {"in_sample": ("in_sample",), "all_2x2": ("in_sample", "oos_context", "oos_game")}


# --------------------------------------------------------------------------------------------------- measurement
def _engine(alias: str, threads: int):
    import torch

    from tomtransfer.services.common.models import is_fetched, model_dir
    from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine
    from tomtransfer.shared.config import ModelSpec

    if not is_fetched(alias):
        raise SystemExit(f"{alias} is not fetched: .venv/bin/tomtransfer models fetch {alias}")
    torch.set_num_threads(threads)
    return TransformersEngine(ModelSpec(model=str(model_dir(alias)), device="cpu", dtype="float32"), threads=threads)


def measure_exact(engine, scenarios, instruction: str, temperature: float) -> list[dict]:
    from tomtransfer.services.teacher.engines.base import ExactRequest
    from tomtransfer.shared.prompts import build_messages

    rows = []
    for s in scenarios:
        msgs = tuple(build_messages(s, instruction))
        kind = "contribution" if s.is_pgg else "choice"
        endowment = int(s.game.endowment) if s.is_pgg else 10
        t0 = time.perf_counter()
        r = engine._exact_sync(ExactRequest(messages=msgs, temperature=temperature, kind=kind, endowment=endowment))
        dt = time.perf_counter() - t0
        row = {"scenario_id": s.id, "family": s.family, "context": s.context.id, "game": s.game_id,
               "payoff_scale": s.payoff_scale, "instruction": instruction, "kind": kind,
               "valid_mass": r.valid_mass, "invalid_mass": r.invalid_mass, "unresolved_mass": r.unresolved_mass,
               "forward_passes": r.forward_passes, "prompt_tokens": r.prompt_tokens, "seconds": round(dt, 3),
               "top_tokens": [{"token": t["token"], "p": round(t["p"], 5), "decides": t["decides"]}
                              for t in r.top_tokens[:5]]}
        if kind == "choice":
            row |= {"p_C": r.p["C"], "p_D": r.p["D"], "q": r.p["C"] / r.valid_mass if r.valid_mass > 0 else None}
        else:
            dist = [r.p[str(a)] for a in range(endowment + 1)]
            row |= {"dist": dist, "mean_contribution": (sum(a * p for a, p in enumerate(dist)) / r.valid_mass
                                                        if r.valid_mass > 0 else None)}
        rows.append(row)
        print(f"  {instruction:17s} {s.id:28s} valid {r.valid_mass:.3f} "
              f"{'q %.3f' % row['q'] if row.get('q') is not None else 'mean %s' % row.get('mean_contribution')}"
              f"  {dt:.1f}s", flush=True)
    return rows


def measure_samples(engine, scenarios, k: int, max_tokens: int, temperature: float, seed: int,
                    rows: list[dict] | None = None, save=None) -> list[dict]:
    """K motivated samples per 2x2 scenario, parsed with the full rule; which lead with a letter (exact mode's part)
    and what the rest answers. `rows`: those measured earlier (same settings; kept), `save(rows)` after each one."""
    from tomtransfer.services.teacher.engines.base import ChatRequest, SamplingParams
    from tomtransfer.services.teacher.exact import lead_choice
    from tomtransfer.shared.parsing import parse_choice
    from tomtransfer.shared.prompts import build_messages

    rows = list(rows or [])
    have = {r["scenario_id"] for r in rows}
    for i, s in enumerate(scenarios):
        if s.id in have:
            continue
        msgs = tuple(build_messages(s, "answer_motivation"))
        t0 = time.perf_counter()
        r = engine._chat_sync(ChatRequest(messages=msgs, params=SamplingParams(
            n=k, temperature=temperature, max_tokens=max_tokens, seed=seed + i)))
        dt = time.perf_counter() - t0
        lead = [lead_choice(c.text) for c in r.choices]
        parsed = [parse_choice(c.text) for c in r.choices]
        tail = [p for ld, p in zip(lead, parsed) if ld is None]
        rows.append({"scenario_id": s.id, "context": s.context.id, "game": s.game_id, "n": k,
                     "max_tokens": max_tokens, "lead_C": lead.count("C"), "lead_D": lead.count("D"),
                     "tail_C": tail.count("C"), "tail_D": tail.count("D"), "tail_invalid": tail.count(None),
                     "all_C": parsed.count("C"), "all_D": parsed.count("D"), "all_invalid": parsed.count(None),
                     "completion_tokens": r.completion_tokens, "seconds": round(dt, 2),
                     "example": r.choices[0].text[:300]})
        print(f"  samples {s.id:24s} parsed C {parsed.count('C')} D {parsed.count('D')} "
              f"invalid {parsed.count(None)}  {dt:.1f}s", flush=True)
        if save is not None:
            save(rows)
    return rows


# ------------------------------------------------------------------------------------------------------ analysis
def _boot_mean(values: list[float], rng: np.random.Generator, n_boot: int) -> dict:
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(x.mean()), "ci95": [float(lo), float(hi)], "n": int(len(x))}


def _two_way_shares(table: dict[tuple[str, str], float]) -> dict:
    """Shares of the total sum of squares of q over a full context x game table explained by the game and the context
    main effects (balanced, no interaction term); the rest is the interaction/residual."""
    ctxs = sorted({c for c, _ in table})
    games = sorted({g for _, g in table})
    if len(table) != len(ctxs) * len(games) or len(table) < 4:
        return {"game": None, "context": None, "rest": None}
    y = np.array([[table[(c, g)] for g in games] for c in ctxs])
    grand = y.mean()
    ss_total = float(((y - grand) ** 2).sum())
    if ss_total <= 0:
        return {"game": 0.0, "context": 0.0, "rest": 0.0, "ss_total": 0.0}
    ss_game = float(len(ctxs) * ((y.mean(axis=0) - grand) ** 2).sum())
    ss_ctx = float(len(games) * ((y.mean(axis=1) - grand) ** 2).sum())
    return {"game": ss_game / ss_total, "context": ss_ctx / ss_total,
            "rest": max(0.0, 1 - (ss_game + ss_ctx) / ss_total), "ss_total": ss_total}


def _blocks(rows: list[dict], families: tuple[str, ...]) -> dict[tuple[str, str], dict[str, float]]:
    """(family, context) -> {game: q} for complete 2x2 blocks."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["kind"] != "choice" or r["family"] not in families or r.get("q") is None:
            continue
        out.setdefault((r["family"], r["context"]), {})[r["game"]] = r["q"]
    return {k: v for k, v in out.items() if all(g in v for g in GAMES)}


def analyze_rows(rows: list[dict], rng: np.random.Generator, n_boot: int) -> dict:
    res: dict = {}
    choice = [r for r in rows if r["kind"] == "choice"]
    for scope, fams in SCOPES.items():
        sel = [r for r in choice if r["family"] in fams]
        blocks = _blocks(rows, fams)
        by_game = {g: statistics.fmean([b[g] for b in blocks.values()]) for g in GAMES} if blocks else {}
        by_ctx = {f"{f}:{c}": statistics.fmean(b.values()) for (f, c), b in blocks.items()}
        effects = {name: _boot_mean([b[a] - b[z] for b in blocks.values()], rng, n_boot)
                   for name, (a, z) in EFFECTS.items()}
        within = [max(b.values()) - min(b.values()) for b in blocks.values()]
        ctx_range = {g: (max(b[g] for b in blocks.values()) - min(b[g] for b in blocks.values())) for g in GAMES} \
            if blocks else {}
        ctx_sd = {g: statistics.pstdev([b[g] for b in blocks.values()]) for g in GAMES} if blocks else {}
        valid = [r["valid_mass"] for r in sel]
        res[scope] = {
            "n_scenarios": len(sel), "n_blocks": len(blocks),
            "valid_mass": {"mean": statistics.fmean(valid) if valid else None,
                           "min": min(valid) if valid else None, "max": max(valid) if valid else None},
            "unresolved_mass_max": max((r["unresolved_mass"] for r in sel), default=None),
            "q_mean": statistics.fmean([r["q"] for r in sel if r.get("q") is not None]) if sel else None,
            "q_by_game": by_game,
            "q_by_context": by_ctx,
            "q_by_context_range": [min(by_ctx.values()), max(by_ctx.values())] if by_ctx else None,
            "game_effect": effects,
            "game_spread_within_context_mean": statistics.fmean(within) if within else None,
            "context_range_by_game": ctx_range,
            "context_range_mean": statistics.fmean(ctx_range.values()) if ctx_range else None,
            "context_sd_by_game": ctx_sd,
        }
    ins = {(c, g): q for (f, c), b in _blocks(rows, ("in_sample",)).items() for g, q in b.items()}
    res["in_sample"]["variance_shares"] = _two_way_shares(ins)
    res["in_sample"]["q_sd_across_scenarios"] = float(np.std(list(ins.values()))) if ins else None
    # doubled payoffs: same context and game, x2 vs x1
    base = {(r["context"], r["game"]): r["q"] for r in choice if r["family"] == "in_sample" and r.get("q") is not None}
    dbl = {(r["context"], r["game"]): r["q"] for r in choice if r["family"] == "oos_game" and r.get("q") is not None}
    diffs = [dbl[k] - base[k] for k in sorted(set(base) & set(dbl))]
    res["doubled_minus_normal"] = _boot_mean(diffs, rng, n_boot)
    res["doubled_minus_normal"]["max_abs"] = max((abs(d) for d in diffs), default=None)
    pgg = [r for r in rows if r["kind"] == "contribution"]
    if pgg:
        res["pgg"] = {"valid_mass": pgg[0]["valid_mass"], "mean_contribution": pgg[0]["mean_contribution"],
                      "mode": int(np.argmax(pgg[0]["dist"])) if pgg[0]["valid_mass"] > 0 else None}
    res["cost"] = {"forward_passes_mean": statistics.fmean(r["forward_passes"] for r in rows),
                   "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in rows),
                   "seconds_per_call_median": statistics.median(r["seconds"] for r in rows)}
    return res


def analyze_pair(t_rows: list[dict], s_rows: list[dict], rng: np.random.Generator, n_boot: int) -> dict:
    tq = {(r["context"], r["game"]): r["q"] for r in t_rows
          if r["family"] == "in_sample" and r.get("q") is not None}
    sq = {(r["context"], r["game"]): r["q"] for r in s_rows
          if r["family"] == "in_sample" and r.get("q") is not None}
    keys = sorted(set(tq) & set(sq))
    gap = {k: tq[k] - sq[k] for k in keys}
    g = np.array([gap[k] for k in keys])
    a, b = np.array([tq[k] for k in keys]), np.array([sq[k] for k in keys])
    corr = float(np.corrcoef(a, b)[0, 1]) if len(keys) > 2 and a.std() > 0 and b.std() > 0 else None
    # the gap's game effect within a context: does the gap differ by game (what a game-level strategy would teach)?
    blocks: dict[str, dict[str, float]] = {}
    for (c, gm), v in gap.items():
        blocks.setdefault(c, {})[gm] = v
    eff = {name: _boot_mean([bl[x] - bl[z] for bl in blocks.values() if x in bl and z in bl], rng, n_boot)
           for name, (x, z) in EFFECTS.items()}
    return {"n": len(keys), "gap_mean": float(g.mean()) if len(g) else None,
            "gap_sd_across_scenarios": float(g.std()) if len(g) else None,
            "gap_abs_mean": float(np.abs(g).mean()) if len(g) else None,
            "gap_variance_shares": _two_way_shares(gap), "gap_game_effect": eff, "corr_teacher_student": corr}


def analyze_samples(samples: list[dict], exact_rows: list[dict], rng: np.random.Generator, n_boot: int) -> dict:
    """The evaluator's teacher reference: exact leading mass + the samples without a leading letter for the rest."""
    from tomtransfer.shared.transfer import Choice

    ex = {r["scenario_id"]: r for r in exact_rows if r["instruction"] == "answer_motivation"}
    rows = []
    for s in samples:
        e = ex[s["scenario_id"]]
        ch = Choice.mixture(e["p_C"], e["p_D"], s["tail_C"], s["tail_D"], s["tail_invalid"])
        pc, pd = ch.probs()
        rows.append({"scenario_id": s["scenario_id"], "family": "in_sample", "context": s["context"],
                     "game": s["game"], "kind": "choice", "valid_mass": pc + pd, "q": ch.q,
                     "unresolved_mass": 0.0, "forward_passes": 0, "prompt_tokens": 0, "seconds": s["seconds"],
                     "parsed_valid_share": (s["all_C"] + s["all_D"]) / s["n"],
                     "parsed_q": s["all_C"] / (s["all_C"] + s["all_D"]) if s["all_C"] + s["all_D"] else None})
    blocks = _blocks(rows, ("in_sample",))
    by_game = {g: statistics.fmean([b[g] for b in blocks.values()]) for g in GAMES} if blocks else {}
    return {"n_samples_per_scenario": samples[0]["n"] if samples else 0,
            "max_tokens": samples[0]["max_tokens"] if samples else None,
            "n_scenarios": len(rows), "n_complete_contexts": len(blocks),
            "valid_mass_mean": statistics.fmean(r["valid_mass"] for r in rows) if rows else None,
            "parsed_valid_share_mean": statistics.fmean(r["parsed_valid_share"] for r in rows) if rows else None,
            "q_by_game": by_game,
            "game_effect": {name: _boot_mean([b[a] - b[z] for b in blocks.values()], rng, n_boot)
                            for name, (a, z) in EFFECTS.items()},
            "rows": rows}


def analyze(data: dict, n_boot: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    meas = data["measurements"]
    out: dict = {"models": {}, "pairs": {}, "mixture": {}}
    for m, by_inst in meas.items():
        out["models"][m] = {inst: analyze_rows(rows, rng, n_boot) for inst, rows in by_inst.items()}
    for t in TEACHERS:
        for s in STUDENTS:
            if t == s or t not in meas or s not in meas or "answer_only" not in meas[s]:
                continue
            for inst in INSTRUCTIONS:
                if inst in meas[t]:
                    out["pairs"][f"{t} ({inst}) -> {s} (answer_only)"] = analyze_pair(
                        meas[t][inst], meas[s]["answer_only"], rng, n_boot)
    for m, by_len in data.get("samples", {}).items():
        for max_tokens, samples in sorted(by_len.items(), key=lambda kv: int(kv[0])):
            if m not in meas or "answer_motivation" not in meas[m]:
                continue
            name = f"{m} @ {max_tokens} tokens"
            out["mixture"][name] = analyze_samples(samples, meas[m]["answer_motivation"], rng, n_boot)
            for s in STUDENTS:
                if s != m and s in meas and "answer_only" in meas[s]:
                    out["pairs"][f"{m} (answer_motivation, lead + samples @ {max_tokens} tokens) -> {s} "
                                 f"(answer_only)"] = analyze_pair(out["mixture"][name]["rows"],
                                                                  meas[s]["answer_only"], rng, n_boot)
    return out


# ---------------------------------------------------------------------------------------------------------- table
def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _ci(e: dict) -> str:
    return f"{_f(e['mean'])} [{_f(e['ci95'][0])}, {_f(e['ci95'][1])}]"


def markdown_table(analysis: dict, scope: str = "in_sample") -> str:
    lines = [f"| model | instruction | valid mass | P(C\\|valid) PD / SH / SD / Del | Del-PD (CI over contexts) | "
             f"SH-SD (CI) | by context (range) | context range within a game (mean) | var. share game / context |",
             "| --- | --- | ---: | --- | --- | --- | --- | ---: | --- |"]
    for m, by_inst in analysis["models"].items():
        for inst, a in by_inst.items():
            s = a[scope]
            bg = s["q_by_game"]
            vs = a["in_sample"].get("variance_shares", {}) if scope == "in_sample" else {}
            share = f"{_f(vs.get('game'), 2)} / {_f(vs.get('context'), 2)}" if vs else "-"
            rng_ = s["q_by_context_range"] or [None, None]
            lines.append(
                f"| {m} | {inst} | {_f(s['valid_mass']['mean'])} | "
                f"{' / '.join(_f(bg.get(g)) for g in GAMES)} | {_ci(s['game_effect']['delight-prison'])} | "
                f"{_ci(s['game_effect']['staghunt-snowdrift'])} | {_f(rng_[0])}-{_f(rng_[1])} | "
                f"{_f(s['context_range_mean'])} | {share} |")
    return "\n".join(lines)


def pairs_table(analysis: dict) -> str:
    lines = ["| teacher (instruction) -> student (answer_only) | mean gap q_T - q_S | SD of the gap across scenarios | "
             "gap variance share game / context | corr(q_T, q_S) |", "| --- | ---: | ---: | --- | ---: |"]
    for name, p in analysis["pairs"].items():
        vs = p["gap_variance_shares"]
        lines.append(f"| {name} | {_f(p['gap_mean'])} | {_f(p['gap_sd_across_scenarios'])} | "
                     f"{_f(vs.get('game'), 2)} / {_f(vs.get('context'), 2)} | {_f(p['corr_teacher_student'], 2)} |")
    return "\n".join(lines)


def mixture_table(analysis: dict) -> str:
    lines = ["| teacher, motivated samples | valid (lead + samples) | parsed valid share | P(C\\|valid) PD / SH / SD / "
             "Del | Del-PD (CI over 5 contexts) | SH-SD (CI) |", "| --- | ---: | ---: | --- | --- | --- |"]
    for name, m in analysis["mixture"].items():
        bg = m["q_by_game"]
        lines.append(f"| {name}, {m['n_samples_per_scenario']} per scenario | {_f(m['valid_mass_mean'])} | "
                     f"{_f(m['parsed_valid_share_mean'])} | {' / '.join(_f(bg.get(g)) for g in GAMES)} | "
                     f"{_ci(m['game_effect']['delight-prison'])} | {_ci(m['game_effect']['staghunt-snowdrift'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--instructions", default=",".join(INSTRUCTIONS))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--boot", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=0, help="motivated samples per in-sample scenario (teachers)")
    ap.add_argument("--sample-max-tokens", type=int, default=None)
    ap.add_argument("--sample-models", default=",".join(TEACHERS))
    ap.add_argument("--reuse", action="store_true", help="keep rows already in --out measured with the same settings")
    ap.add_argument("--analyze-only", action="store_true")
    args = ap.parse_args(argv)

    from tomtransfer.shared.config import load_config
    from tomtransfer.shared.scenarios import default_catalog

    cfg = load_config(CONFIG)
    temperature = float(cfg.sampling.temperature)
    max_tokens = args.sample_max_tokens or int(cfg.sampling.max_tokens)
    out = Path(args.out)
    settings = {"temperature": temperature, "min_mass": 1e-6, "max_depth": 8, "dtype": "float32", "device": "cpu"}
    data = {"settings": settings, "measurements": {}, "samples": {}, "meta": {}}
    if (args.reuse or args.analyze_only) and out.is_file():
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            data["measurements"] = old.get("measurements", {})
            data["samples"] = old.get("samples", {})
            data["meta"] = old.get("meta", {})
    scenarios = sorted(default_catalog().scenarios.values(), key=lambda s: (s.family, s.context.id, s.game_id))
    if not args.analyze_only:
        sample_models = set(filter(None, args.sample_models.split(",")))
        for alias in filter(None, args.models.split(",")):
            todo = [i for i in args.instructions.split(",") if i not in data["measurements"].get(alias, {})]
            have = data["samples"].get(alias, {}).get(str(max_tokens)) or []
            if have and have[0]["n"] != args.samples:
                have = []  # another K: measured afresh
            n_in = sum(s.family == "in_sample" for s in scenarios)
            want_samples = args.samples > 0 and alias in sample_models and len(have) < n_in
            if not todo and not want_samples:
                print(f"{alias}: reused", flush=True)
                continue
            print(f"== {alias}", flush=True)
            t0 = time.perf_counter()
            engine = _engine(alias, args.threads)
            load_s = time.perf_counter() - t0
            for inst in todo:
                data["measurements"].setdefault(alias, {})[inst] = measure_exact(engine, scenarios, inst, temperature)
                data["meta"].setdefault(alias, {}).update(
                    {"load_s": round(load_s, 1), "params": int(sum(p.numel() for p in engine.base.parameters())),
                     "when": time.strftime("%Y-%m-%d %H:%M:%S")})
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(data, indent=1) + "\n")
            if want_samples:
                ins = [s for s in scenarios if s.family == "in_sample"]
                def save(rows, alias=alias):
                    data["samples"].setdefault(alias, {})[str(max_tokens)] = rows
                    out.write_text(json.dumps(data, indent=1) + "\n")

                save(measure_samples(engine, ins, args.samples, max_tokens, temperature, args.seed, have, save))
                out.write_text(json.dumps(data, indent=1) + "\n")
            asyncio.run(engine.close())
            del engine
            gc.collect()
    data["analysis"] = analyze(data, args.boot, args.seed)
    data["analysis"]["boot"] = {"resamples": args.boot, "seed": args.seed, "unit": "context block"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(markdown_table(data["analysis"], "in_sample"))
    print()
    print(markdown_table(data["analysis"], "all_2x2"))
    print()
    print(pairs_table(data["analysis"]))
    if data["analysis"]["mixture"]:
        print()
        print(mixture_table(data["analysis"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
