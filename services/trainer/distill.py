"""The distribution objective's batches and loss: the student's choice distribution over action strings, and its
divergence from the teacher's (`services.trainer.softlabels`).

The student's distribution on a scenario: the log-likelihood of each action string's tokens after the chat-templated
prompt (the prompt with the generation prompt, tokenized separately from the action as `encode_example` tokenizes
prompt and completion), softmax over the actions:

    log q(a) = log P_student(tokens(a) | prompt) - logsumexp_b log P_student(tokens(b) | prompt)

An action is the whole answer: where one action's tokens are a proper prefix of another's (a tokenizer that splits
"10" into "1" "0"), the shorter one keeps only the mass that does not continue into the longer ones,
P(1) - P(10), as exact mode counts "10" as 10 and never as 1. Nothing here depends on the teacher's tokenizer: the
target is a distribution over strings, so a Qwen teacher can teach a SmolLM2 student.

Loss: forward KL(p_teacher || q_student) = sum_a p(a) (log p(a) - log q(a)), summed over scenarios (the caller
divides by the number of scenarios in the effective batch). Why forward KL and not reverse KL or JS: the target is a
fixed, fully known distribution over a handful of actions, and forward KL is its cross-entropy minus a constant, so
its gradient is exactly that of soft-label cross-entropy: mass-covering (the student must put mass wherever the
teacher does, which is the point: a 70/30 teacher should give a 70/30 student, not a 100/0 one, which reverse KL's
mode seeking allows), zero-probability actions of the teacher cost nothing, and it does not saturate when the two
are far apart (JS's gradient vanishes there, slowing the first steps on a student that starts far from the teacher).

Cost: one sequence per scenario (the prompt) scores every single-token action; each multi-token action adds one
sequence (prompt + its tokens but the last). Logits only from the first scored position on (as the SFT path).
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


class ObjectiveError(ValueError):
    """Soft labels the student cannot be trained on (an action string that tokenizes to nothing)."""


def action_token_ids(tokenizer, actions: list[str]) -> list[list[int]]:
    """Each action's token ids as the student would emit it after the generation prompt; raises ObjectiveError for
    an action that tokenizes to nothing or two actions with the same tokens."""
    ids = [list(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in actions]
    for a, t in zip(actions, ids):
        if not t:
            raise ObjectiveError(f"the action string {a!r} tokenizes to nothing with the student's tokenizer: the "
                                 "distribution objective cannot score it")
    seen: dict[tuple, str] = {}
    for a, t in zip(actions, ids):
        if tuple(t) in seen:
            raise ObjectiveError(f"the actions {seen[tuple(t)]!r} and {a!r} tokenize alike with the student's "
                                 "tokenizer: the distribution objective cannot tell them apart")
        seen[tuple(t)] = a
    return ids


def encode_soft_label(tokenizer, row: dict, max_len: int, render) -> dict | None:
    """One soft-label row -> {prompt_ids, action_ids, probs, input_ids, labels}; None where the prompt and the
    longest action do not fit `max_len`. `render(tokenizer, messages, add_generation_prompt)` is the trainer's chat
    renderer. input_ids/labels (prompt + the teacher's likeliest action) only serve the probe logits."""
    prompt = render(tokenizer, row["messages"], True)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    action_ids = action_token_ids(tokenizer, list(row["actions"]))
    if len(prompt_ids) + max(len(t) for t in action_ids) - 1 >= max_len:
        return None
    top = max(range(len(action_ids)), key=lambda i: row["probs"][i])
    return {"prompt_ids": prompt_ids, "action_ids": action_ids, "probs": [float(p) for p in row["probs"]],
            "input_ids": prompt_ids + action_ids[top],
            "labels": [IGNORE_INDEX] * len(prompt_ids) + action_ids[top], "scenario_id": row.get("scenario_id")}


def _sequences(rows: list[dict]) -> tuple[list[list[int]], list[list[tuple[int, int, int]]]]:
    """Sequences to run and, per row and action, (sequence, first scored position, n tokens)."""
    seqs: list[list[int]] = []
    where: list[list[tuple[int, int, int]]] = []
    for r in rows:
        p = r["prompt_ids"]
        prompt_seq = None
        spots = []
        for toks in r["action_ids"]:
            if len(toks) == 1:
                if prompt_seq is None:
                    prompt_seq = len(seqs)
                    seqs.append(list(p))
                spots.append((prompt_seq, len(p) - 1, 1))
            else:
                seqs.append(list(p) + list(toks[:-1]))
                spots.append((len(seqs) - 1, len(p) - 1, len(toks)))
        where.append(spots)
    return seqs, where


def _prefix_fix(logp: torch.Tensor, action_ids: list[list[int]]) -> torch.Tensor:
    """log P(a as the whole answer): subtract the mass of longer actions that a's tokens are a proper prefix of."""
    out = []
    for i, a in enumerate(action_ids):
        longer = [j for j, b in enumerate(action_ids) if len(b) > len(a) and b[: len(a)] == a]
        if not longer:
            out.append(logp[i])
            continue
        ext = torch.logsumexp(logp[longer], dim=0)
        gap = torch.clamp(ext - logp[i], max=-1e-6)  # P(longer) <= P(prefix) always; rounding aside
        out.append(logp[i] + torch.log1p(-torch.exp(gap)))
    return torch.stack(out)


def choice_log_probs(model, rows: list[dict], pad_id: int, device, autocast=None) -> tuple[list[torch.Tensor], int]:
    """The student's log q(action) per row (normalised over the row's actions), differentiable, and the number of
    tokens run. `rows`: `encode_soft_label` outputs."""
    seqs, where = _sequences(rows)
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    first = min(pos for spots in where for _, pos, _ in spots)
    keep = longest - first
    ctx = autocast if autocast is not None else torch.autocast(device.type, enabled=False)
    with ctx:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (S, keep, V); position t -> index t - first
    out = []
    for r, spots in zip(rows, where):
        per_action = []
        for (seq, pos, n), toks in zip(spots, r["action_ids"]):
            idx = torch.arange(n, device=logprobs.device) + (pos - first)
            tok = torch.tensor(toks, device=logprobs.device)
            per_action.append(logprobs[seq, idx, tok].sum())
        lp = _prefix_fix(torch.stack(per_action), r["action_ids"])
        out.append(lp - torch.logsumexp(lp, dim=0))
    return out, int(mask.sum())


def kl_terms(log_q: list[torch.Tensor], rows: list[dict]) -> torch.Tensor:
    """Forward KL(p || q) per row (a tensor of len(rows))."""
    terms = []
    for lq, r in zip(log_q, rows):
        p = torch.tensor(r["probs"], dtype=lq.dtype, device=lq.device)
        pos = p > 0
        terms.append((p[pos] * (torch.log(p[pos]) - lq[pos])).sum())
    return torch.stack(terms)


def kl_sum(model, rows: list[dict], pad_id: int, device, autocast=None) -> tuple[torch.Tensor, int]:
    """Sum over `rows` of KL(teacher || student), and the tokens run."""
    log_q, tokens = choice_log_probs(model, rows, pad_id, device, autocast)
    return kl_terms(log_q, rows).sum(), tokens


@torch.no_grad()
def student_distributions(model, rows: list[dict], pad_id: int, device, batch: int = 8) -> list[list[float]]:
    """q(action) per row, in eval mode (for tests and reports)."""
    was = model.training
    model.eval()
    out: list[list[float]] = []
    for i in range(0, len(rows), batch):
        lq, _ = choice_log_probs(model, rows[i : i + batch], pad_id, device)
        out += [x.exp().tolist() for x in lq]
    model.train(was)
    return out


def kl(p: list[float], q: list[float]) -> float:
    return float(sum(a * (math.log(a) - math.log(max(b, 1e-300))) for a, b in zip(p, q) if a > 0))
