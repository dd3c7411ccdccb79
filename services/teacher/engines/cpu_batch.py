"""Batch-invariant decoding of many requests at once on the CPU (the transformers engine's sampling path there).

Decode on a CPU is bound by reading the weights: one step of 4 rows costs nearly what a step of 64 rows costs.
So the engine decodes the live samples of *every* pending request (each request a `_Group`: its own prompt, its
own rows, its own sampling state) in one step (`TiledStep.step`): the token-wise parts of each layer (norms,
projections, MLP, LM head) run over all rows of all groups, the attention runs per group over its own prompt
K/V (shared by the group's rows, as `SharedPrefixDecoder` does) and its rows' suffix buffers.

Batch invariance: a request's samples must not depend on what it happened to be batched with (a resumed run, or
the same request sent alone, gives the same samples for the same (seed, n)). Matrix products are not invariant to
the number of rows on this hardware (MKL's fp32 GEMM picks other kernels for 1, 2-3, 4-15 and 128+ rows; the
rounding of a row changes with them), so every token-wise op runs on fixed tiles of `tile` rows (the batch is
padded to a multiple): a row's numbers then depend only on its own values, never on the batch size or on the other
rows of its tile (checked for the shapes used: `tests/test_engine_transformers.py`). The per-group work
(rotary embedding, attention, sampling) sees exactly the tensors it would see alone. Element-wise ops on a tile
stay invariant where a row's offset in the tile is a multiple of the SIMD width (hidden and MLP sizes multiples of
64, `invariant_dims`); a model without that is decoded one request at a time (same code, one group).

The LM head is computed in vocabulary slices (each slice's weight stays in cache across the tiles).
"""

from __future__ import annotations

import torch

from tomtransfer.services.teacher.engines.decoder_ops import cache_from, causal_lm, rope_apply, shared_prefix_attention
from tomtransfer.services.teacher.engines.decoding import Prefix, PromptKV, SharedPrefixDecoder, State

TILE = 16  # rows per token-wise op call (fixed: see the module docstring)
VOCAB_SLICE = 8192  # LM-head rows per product


def invariant_dims(dec: SharedPrefixDecoder) -> bool:
    """True where a row's offset inside a tile is always SIMD-aligned (sizes multiples of 64 elements)."""
    cfg = dec.lm.config
    return cfg.hidden_size % 64 == 0 and cfg.intermediate_size % 64 == 0


class TiledStep:
    """One decode step over the rows of several groups (each a `State` of a `SharedPrefixDecoder`)."""

    def __init__(self, dec: SharedPrefixDecoder, tile: int = TILE, lm_head_weight: torch.Tensor | None = None):
        self.dec, self.tile = dec, tile
        self.lm = dec.lm
        # an fp32 LM head beside a bf16 body (the engine's choice on CPUs with AMX): logits keep fp32 precision
        self.head_w = lm_head_weight

    def _map(self, fn, *xs: torch.Tensor) -> torch.Tensor:
        T = self.tile
        return torch.cat([fn(*(x[a:a + T] for x in xs)) for a in range(0, xs[0].shape[0], T)])

    def _norm(self, norm):
        return lambda x: torch.nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)

    def _head(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        head = self.lm.lm_head
        T = self.tile
        if self.head_w is None and type(head) is not torch.nn.Linear:
            return self._map(lambda t: head(t).float(), x)[:rows]
        w = self.head_w if self.head_w is not None else head.weight
        b = None if self.head_w is not None else head.bias
        x = x.to(w.dtype)
        V = w.shape[0]
        out = torch.empty((x.shape[0], V), dtype=torch.float32)
        for c in range(0, V, VOCAB_SLICE):
            ws = w[c:c + VOCAB_SLICE]
            bs = None if b is None else b[c:c + VOCAB_SLICE]
            for a in range(0, x.shape[0], T):
                out[a:a + T, c:c + VOCAB_SLICE] = torch.nn.functional.linear(x[a:a + T], ws, bs)
        return out[:rows]

    @torch.inference_mode()
    def step(self, states: list[State], feeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Feed one token per row of every state; returns each state's next-token logits (rows, V), float32."""
        dec, lm, T = self.dec, self.lm, self.tile
        sizes = [int(f.numel()) for f in feeds]
        B = sum(sizes)
        P = -(-B // T) * T
        tok = torch.zeros(P, dtype=torch.long)
        tok[:B] = torch.cat([f.view(-1) for f in feeds])
        x = lm.model.embed_tokens(tok)  # (P, hidden)
        Hkv, G, D = dec.n_kv, dec.group, dec.head_dim
        H = Hkv * G
        ropes = [dec._rope(x, torch.tensor([s.prefix.length + s.t])) for s in states]
        offs = [0]
        for n in sizes:
            offs.append(offs[-1] + n)
        for i, layer in enumerate(lm.model.layers):
            att, mlp = layer.self_attn, layer.mlp
            h = self._map(self._norm(layer.input_layernorm), x)
            q, k, v = self._map(att.q_proj, h), self._map(att.k_proj, h), self._map(att.v_proj, h)
            o = torch.zeros((P, H * D), dtype=x.dtype)
            for s, (cos, sin_s), a, b in zip(states, ropes, offs, offs[1:]):
                n, t = b - a, s.t
                qg = rope_apply(q[a:b].view(n, H, D), cos, sin_s) * dec.scaling
                kg = rope_apply(k[a:b].view(n, Hkv, D), cos, sin_s)
                s.ks[i].select(2, t).copy_(kg)
                s.vs[i].select(2, t).copy_(v[a:b].view(n, Hkv, D))
                kp, vp = s.prefix.kv[i]
                o[a:b] = shared_prefix_attention(qg.reshape(n, Hkv, G, D), kp, vp, s.ks[i][:, :, :t + 1],
                                                 s.vs[i][:, :, :t + 1], None)
            x = self._map(lambda x_, o_: x_ + att.o_proj(o_), x, o)
            h = self._map(self._norm(layer.post_attention_layernorm), x)
            g_, u_ = self._map(mlp.gate_proj, h), self._map(mlp.up_proj, h)
            x = self._map(lambda x_, g, u: x_ + mlp.down_proj(mlp.act_fn(g) * u), x, g_, u_)
        x = self._map(self._norm(lm.model.norm), x)
        logits = self._head(x, B)
        for s in states:
            if s.t >= s.capacity:
                raise RuntimeError("decode capacity exceeded")
            s.t += 1
        return [logits[a:b] for a, b in zip(offs, offs[1:])]


# ------------------------------------------------------------------------------------------ prompts
def _body(model, ids: list[int], past: PromptKV | None):
    """The transformer body (no LM head) over `ids`, continuing from `past`; LoRA layers apply (peft injects them
    into the body's modules)."""
    body = causal_lm(model).model
    if past is None:
        return body(input_ids=torch.tensor([ids]), use_cache=True)
    if len(ids) <= past.length:
        raise ValueError("a cached prefix must leave at least one prompt token to compute")
    return body(input_ids=torch.tensor([ids[past.length:]]), past_key_values=cache_from(past), use_cache=True)


def prompt_kv(model, ids: list[int]) -> PromptKV:
    """The K/V of a prompt prefix (the body only: a prefix's logits are never used)."""
    out = _body(model, ids, None)
    return PromptKV(length=len(ids), layers=tuple((layer.keys, layer.values) for layer in out.past_key_values.layers))


def prefill(model, ids: list[int], past: PromptKV | None, head_weight: torch.Tensor | None) -> Prefix:
    """`SharedPrefixDecoder.prefill` on the CPU: the body, then the LM head on the last position only, as one
    contiguous row (HF's own head call on the sliced last position copies the whole bf16 head weight first: 2-4 s a
    prompt for Qwen2.5-0.5B) and in fp32 where `head_weight` is given."""
    out = _body(model, ids, past)
    h = out.last_hidden_state[0, -1:].contiguous()
    head = causal_lm(model).lm_head
    if head_weight is not None:
        logits = torch.nn.functional.linear(h.to(head_weight.dtype), head_weight)
    else:
        logits = head(h)
    kv = [(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in out.past_key_values.layers]
    return Prefix(length=len(ids), logits=logits[0].float(), kv=kv)
