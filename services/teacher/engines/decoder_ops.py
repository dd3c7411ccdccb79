"""The tensor operations every shared-prefix decoder uses: the eager one (`decoding.SharedPrefixDecoder`), its CUDA
fast path (`cuda_fastpath.CudaGraphDecoder`) and the batched CPU step (`cpu_batch.TiledStep`). Plain functions of
tensors and modules, no decoder state: each decoder imports them from here, none reaches into another's internals.
"""

from __future__ import annotations

import torch


def causal_lm(model):
    """The *ForCausalLM module under a possible peft wrapper."""
    inner = model
    if hasattr(inner, "peft_config") and hasattr(inner, "base_model"):
        inner = inner.base_model  # LoraModel
        inner = getattr(inner, "model", inner)
    return inner


def cache_from(past):
    """A fresh HF `DynamicCache` around a cached prompt prefix's K/V, `past` a `decoding.PromptKV` (its tensors are
    not copied)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(past.layers):
        cache.update(k, v, i)
    return cache


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin_s: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with the sign of rotate_half folded into `sin_s` = (-sin[:h], sin[h:]):
    three kernels (cat, mul, addcmul) instead of five."""
    h = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., h:], x[..., :h]), dim=-1), sin_s)


def shared_prefix_attention(qg, kp, vp, ks, vs, jmask):
    """Attention of one decode step over [shared prompt keys, per-row suffix keys] -> (B, Hkv*G*D).

    qg (B, Hkv, G, D) pre-scaled queries; kp/vp (Hkv, L, D) the prompt's K/V, shared by all rows: all rows'
    queries of one KV head meet that head's prompt keys in one matrix product (the prompt is read once per step,
    not once per row); ks/vs (B, Hkv, S, D) each row's own suffix; jmask (L + S,) bool (False: padding or a
    suffix slot not written yet) or None. Both score blocks, ONE softmax over their concatenation (so no
    log-sum-exp merge), and the two value products: ~10 kernels."""
    B, Hkv, G, D = qg.shape
    L = kp.shape[1]
    qp = qg.permute(1, 0, 2, 3).reshape(Hkv, B * G, D)
    sp = torch.matmul(qp, kp.transpose(-1, -2))  # (Hkv, B*G, L)
    ss = torch.matmul(qg, ks.transpose(-1, -2))  # (B, Hkv, G, S)
    sc = torch.cat((sp.view(Hkv, B, G, L).permute(1, 0, 2, 3), ss), dim=-1)  # (B, Hkv, G, L + S)
    if jmask is not None:
        sc = sc.masked_fill(~jmask, float("-inf"))
    pr = torch.softmax(sc, dim=-1)  # float accumulation inside, output in the model's dtype
    pp = pr[..., :L].permute(1, 0, 2, 3).reshape(Hkv, B * G, L)
    op = torch.matmul(pp, vp).view(Hkv, B, G, D).permute(1, 0, 2, 3)
    return (torch.matmul(pr[..., L:], vs) + op).reshape(B, Hkv * G * D)
