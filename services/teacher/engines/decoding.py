"""Decoders for the transformers engine: prefill a prompt once, then decode many rows from it.

Interface (both implementations):

    prefix = dec.prefill(prompt_ids)             one forward over the prompt -> Prefix (KV + last logits)
    state  = dec.start(prefix, rows, capacity)   a batch of `rows` continuations of that prompt
    logits = dec.step(state, tokens)             feed one token per row -> next-token logits (rows, V)
    dec.select(state, index)                     keep/reorder rows (drop finished ones, tree expansion)

`HFDecoder` works for any causal LM: it expands the HF `DynamicCache` to the batch and calls the model.

`SharedPrefixDecoder` is the fast path for the Llama family (llama, qwen2, mistral without sliding
window). It calls the model's own modules (norms, projections, MLP, rotary embedding - so peft LoRA
layers injected into them apply as usual) but keeps the attention cache in two parts:

- the prompt's K/V once, shared by all rows: each decode step reads it once for the whole batch
  (queries of all rows are stacked into one matrix product per KV head, cascade/"Hydragen" style),
  instead of once per row - for 300 samples of a 300-token prompt that is 300x less KV traffic;
- a preallocated per-row suffix buffer (rows x heads x capacity x dim): no `torch.cat` per step.

Both score blocks go through ONE softmax over their concatenation (`_attention`). Without adapters q/k/v and
gate/up run as fused matrix products. On CUDA the decode step is captured as a CUDA graph (`graphs=True`) per
(rows, capacity, prompt-length bucket, suffix-span bucket), kept in a small pool and replayed across requests:
static shapes (the prompt is padded to its bucket and the suffix to its span bucket, both masked), the step index
and the prompt length live in device tensors, sampling stays outside the graph. The prompt forward is a CUDA
graph per prompt bucket too (`_graph_prefill`). `TOMTRANSFER_COMPILE=1` additionally compiles the fused layer
(`_fused_layer`) and by default switches the suffix attention to a Triton kernel that reads each row's slots in
use once (`_triton_suffix_op`), merged with the prompt part by the log-sum-exps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

SUPPORTED_FAST = ("llama", "qwen2", "mistral")


@dataclass
class Prefix:
    length: int
    logits: torch.Tensor  # (V,) float32, after the last prompt token
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # shared path: per layer (Hkv, L, D)
    cache: object = None  # HF path: the DynamicCache of the prompt (batch 1)


@dataclass
class State:
    prefix: Prefix
    rows: int
    capacity: int
    t: int = 0  # tokens fed so far
    cache: object = None  # HF path
    ks: list[torch.Tensor] = field(default_factory=list)  # shared path: per layer (B, Hkv, cap, D)
    vs: list[torch.Tensor] = field(default_factory=list)
    graph: object = None


@dataclass(frozen=True)
class PromptKV:
    """The K/V of a prompt prefix for batch 1: per layer (1, Hkv, length, D) keys and values. Never modified:
    a forward that continues from it builds a fresh cache around the same tensors."""

    length: int
    layers: tuple

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def _cache_from(past: PromptKV):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(past.layers):
        cache.update(k, v, i)
    return cache


def forward_prompt(model, ids: list[int], past: PromptKV | None = None):
    """The prompt forward (logits of the last position only: the LM head over every prompt position was ~30 % of
    a Qwen2.5-0.5B prefill on CPU), continuing from `past` (the K/V of `ids[:past.length]`) when given."""
    dev = model.device
    if past is None:
        return model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1)
    if len(ids) <= past.length:
        raise ValueError("a cached prefix must leave at least one prompt token to compute")
    return model(input_ids=torch.tensor([ids[past.length:]], device=dev), past_key_values=_cache_from(past),
                 use_cache=True, logits_to_keep=1)


def prompt_kv(model, ids: list[int]) -> PromptKV:
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True, logits_to_keep=1)
    return PromptKV(length=len(ids), layers=tuple((layer.keys, layer.values) for layer in out.past_key_values.layers))


def _causal_lm(model):
    """The *ForCausalLM module under a possible peft wrapper."""
    inner = model
    if hasattr(inner, "peft_config") and hasattr(inner, "base_model"):
        inner = inner.base_model  # LoraModel
        inner = getattr(inner, "model", inner)
    return inner


def fast_path_supported(model) -> tuple[bool, str]:
    lm = _causal_lm(model)
    cfg = lm.config
    if cfg.model_type not in SUPPORTED_FAST:
        return False, f"model_type {cfg.model_type!r} (fast path covers {', '.join(SUPPORTED_FAST)})"
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return False, "sliding-window attention"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False, "non-full attention layers"
    inner = getattr(lm, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False, "unexpected module layout"
    att = inner.layers[0].self_attn
    if not all(hasattr(att, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
        return False, "unexpected attention layout"
    return True, "ok"


class HFDecoder:
    name = "hf"

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def prefill(self, ids: list[int], past: "PromptKV | None" = None) -> Prefix:
        out = forward_prompt(self.model, ids, past)
        return Prefix(length=len(ids), logits=out.logits[0, -1].float(), cache=out.past_key_values)

    def start(self, prefix: Prefix, rows: int, capacity: int, graph: bool = True) -> State:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, layer in enumerate(prefix.cache.layers):
            cache.update(layer.keys.expand(rows, *layer.keys.shape[1:]).contiguous(),
                         layer.values.expand(rows, *layer.values.shape[1:]).contiguous(), i)
        return State(prefix=prefix, rows=rows, capacity=capacity, cache=cache)

    @torch.inference_mode()
    def step(self, state: State, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens.view(-1, 1).to(self.model.device), past_key_values=state.cache, use_cache=True)
        state.cache = out.past_key_values
        state.t += 1
        return out.logits[:, -1].float()

    def select(self, state: State, index: torch.Tensor) -> None:
        index = index.to(self.model.device)
        for layer in state.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        state.rows = int(index.numel())


def _rope_apply(x: torch.Tensor, cos: torch.Tensor, sin_s: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with the sign of rotate_half folded into `sin_s` = (-sin[:h], sin[h:]):
    three kernels (cat, mul, addcmul) instead of five."""
    h = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., h:], x[..., :h]), dim=-1), sin_s)


def _is_plain_linear(m) -> bool:
    return type(m) is torch.nn.Linear


def _attn_lse_manual(q, k, v, mask):
    """softmax(q k^T) v and its log-sum-exp over keys; q (..., Sq, D) pre-scaled, mask (Sk,) bool or None."""
    s = torch.matmul(q, k.transpose(-1, -2)).float()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)).to(v.dtype), v)
    return out, lse


def _attn_lse_cuda(q, k, v, bias):
    """The same on CUDA with PyTorch's memory-efficient attention kernel (one kernel, returns the LSE)."""
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=1.0)
    return out, lse[..., : q.shape[-2]]


_FLASH_LSE_HEADS_FIRST = [True]
_TRITON_OP: list = []
_TRITON_CFG = {"BLOCK_S": int(os.environ.get("TOMTRANSFER_TRITON_BLOCK", "32")),
               "num_warps": int(os.environ.get("TOMTRANSFER_TRITON_WARPS", "1")),
               "num_stages": int(os.environ.get("TOMTRANSFER_TRITON_STAGES", "2"))}


def _triton_suffix_op():
    """A Triton decode-attention kernel over each row's own suffix, registered as a custom op (opaque to
    torch.compile, capturable in a CUDA graph). One program per (row, query head): the row's first `used` slots
    of K/V (B, Hkv, cap, D) are read once, in blocks, with an online softmax; returns out (B, H, D) and the
    log-sum-exp (B, H) float32. Built on first use; raises where Triton is missing."""
    if _TRITON_OP:
        return _TRITON_OP[0]
    import triton
    import triton.language as tl

    @triton.jit
    def _kernel(Q, K, V, O, LSE, USED, cap, H, G, D: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        hkv = H // G
        n = tl.load(USED)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + pid * D + offs_d).to(tl.float32)
        base = (b * hkv + h // G).to(tl.int64) * cap * D
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([D], dtype=tl.float32)
        for start in range(0, n, BLOCK_S):
            offs_s = start + tl.arange(0, BLOCK_S)
            msk = offs_s < n
            ptr = base + offs_s[:, None] * D + offs_d[None, :]
            k = tl.load(K + ptr, mask=msk[:, None], other=0.0).to(tl.float32)
            sc = tl.sum(k * q[None, :], axis=1)
            sc = tl.where(msk, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(sc - m_new)
            v = tl.load(V + ptr, mask=msk[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(pr[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(pr, axis=0)
            m_i = m_new
        tl.store(O + pid * D + offs_d, (acc / l_i).to(O.dtype.element_ty))
        tl.store(LSE + pid, m_i + tl.log(l_i))

    @torch.library.custom_op("tomtransfer::suffix_attention", mutates_args=())
    def suffix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: torch.Tensor,
                         group: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, D = q.shape
        q = q.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty((B, H), dtype=torch.float32, device=q.device)
        c = _TRITON_CFG
        _kernel[(B * H,)](q, k, v, out, lse, used, k.shape[2], H, group, D=D, BLOCK_S=c["BLOCK_S"],
                          num_warps=c["num_warps"], num_stages=c["num_stages"])
        return out, lse

    @suffix_attention.register_fake
    def _(q, k, v, used, group):
        return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)

    _TRITON_OP.append(suffix_attention)
    return suffix_attention


def _flash_suffix(qg, ks, vs, flash):
    """Each row's query against its own suffix with PyTorch's flash-attention kernel (varlen form): ks/vs are the
    whole (B, cap, Hkv, D) buffers, row b's keys are slots [0, used[b]) (`seqused_k`), so no padding is read and no
    mask is needed. Returns (out (B, H, D), lse (B, H) float32)."""
    B, Hkv, G, D = qg.shape
    cu_q, cu_k, used = flash
    cap = ks.shape[1]
    out, lse = torch.ops.aten._flash_attention_forward(
        qg.reshape(B, Hkv * G, D), ks.view(B * cap, Hkv, D), vs.view(B * cap, Hkv, D), cu_q, cu_k, 1, cap, 0.0,
        False, False, scale=1.0, seqused_k=used)[:2]
    if lse.dim() == 3:  # (B, H, max_q)
        lse = lse[..., 0]
    elif _FLASH_LSE_HEADS_FIRST[0]:  # (H, total_q): the varlen layout (found by `_check_flash`)
        lse = lse.t()
    return out, lse


def _attention(qg, kp, vp, ks, vs, jmask, cuda_attn: bool = False, flash=None, tsuffix=None):
    """Attention of one decode step over [shared prompt keys, per-row suffix keys] -> (B, Hkv*G*D).

    qg (B, Hkv, G, D) pre-scaled queries; kp/vp (Hkv, L, D) the prompt's K/V, shared by all rows: all rows'
    queries of one KV head meet that head's prompt keys in one matrix product (the prompt is read once per step,
    not once per row); ks/vs (B, Hkv, S, D) each row's own suffix; jmask (L + S,) bool (False: padding or a
    suffix slot not written yet) or None. The plain form computes both score blocks, ONE softmax over their
    concatenation (so no log-sum-exp merge), and the two value products: ~10 kernels. `cuda_attn`: PyTorch's
    memory-efficient kernel per part, merged by the log-sum-exps (weight sigmoid(lse_p - lse_s))."""
    B, Hkv, G, D = qg.shape
    L = kp.shape[1]
    qp = qg.permute(1, 0, 2, 3).reshape(Hkv, B * G, D)
    if flash is not None or tsuffix is not None:  # suffix by a kernel with lengths; jmask: the prompt's mask
        op, lp = _attn_lse_manual(qp, kp, vp, jmask)  # (Hkv, B*G, D), (Hkv, B*G)
        if flash is not None:
            os_, ls = _flash_suffix(qg, ks, vs, flash)
        else:  # full (B, Hkv, cap, D) buffers, `tsuffix` (1,) = slots in use
            os_, ls = _triton_suffix_op()(qg.reshape(B, Hkv * G, D), ks, vs, tsuffix, G)
        op = op.view(Hkv, B, G, D).permute(1, 0, 2, 3).reshape(B, Hkv * G, D)
        w = torch.sigmoid(lp.view(Hkv, B, G).permute(1, 0, 2).reshape(B, Hkv * G) - ls).unsqueeze(-1)
        return torch.lerp(os_.float(), op.float(), w).to(qg.dtype).reshape(B, Hkv * G * D)
    if cuda_attn:
        S = ks.shape[2]
        bias = pbias = None
        if jmask is not None:
            neg = torch.zeros(L + S, device=qg.device, dtype=qg.dtype).masked_fill(~jmask, float("-inf"))
            pbias = neg[:L].view(1, 1, 1, L).expand(1, Hkv, B * G, L)
            bias = neg[L:].view(1, 1, 1, S).expand(B, Hkv, G, S)
        op, lp = _attn_lse_cuda(qp.unsqueeze(0), kp.unsqueeze(0), vp.unsqueeze(0), pbias)
        os_, ls = _attn_lse_cuda(qg, ks, vs, bias)
        op = op.view(Hkv, B, G, D).permute(1, 0, 2, 3)
        w = torch.sigmoid(lp.view(Hkv, B, G).permute(1, 0, 2) - ls).unsqueeze(-1)  # = e^lp / (e^lp + e^ls)
        return torch.lerp(os_.float(), op.float(), w).to(qg.dtype).reshape(B, Hkv * G * D)
    sp = torch.matmul(qp, kp.transpose(-1, -2))  # (Hkv, B*G, L)
    ss = torch.matmul(qg, ks.transpose(-1, -2))  # (B, Hkv, G, S)
    sc = torch.cat((sp.view(Hkv, B, G, L).permute(1, 0, 2, 3), ss), dim=-1)  # (B, Hkv, G, L + S)
    if jmask is not None:
        sc = sc.masked_fill(~jmask, float("-inf"))
    pr = torch.softmax(sc, dim=-1)  # float accumulation inside, output in the model's dtype
    pp = pr[..., :L].permute(1, 0, 2, 3).reshape(Hkv, B * G, L)
    op = torch.matmul(pp, vp).view(Hkv, B, G, D).permute(1, 0, 2, 3)
    return (torch.matmul(pr[..., L:], vs) + op).reshape(B, Hkv * G * D)


def _fused_layer(x, w_qkv, b_qkv, w_o, w_gu, w_down, n1, n2, eps: float, cos, sin_s, kp, vp, ks, vs, t_idx, jmask,
                 H: int, Hkv: int, G: int, D: int, scaling: float, cuda_attn: bool = False, flash=None,
                 tsuffix=None):
    """One decoder layer, static (graph) form, fused weights, plain attention math: a pure function of tensors, so
    one `torch.compile` serves every layer (TOMTRANSFER_COMPILE=1). jmask: (prompt bucket + suffix span,)."""
    F = torch.nn.functional
    B = x.shape[0]
    h = F.rms_norm(x, (x.shape[-1],), n1, eps)
    qkv = F.linear(h, w_qkv, b_qkv).view(B, H + 2 * Hkv, D)
    qk = _rope_apply(qkv[:, : H + Hkv], cos, sin_s)
    q, k, v = qk[:, :H] * scaling, qk[:, H:], qkv[:, H + Hkv:]
    if flash is not None:  # suffix buffers (B, cap, Hkv, D), jmask: the prompt's
        ks.index_copy_(1, t_idx, k.unsqueeze(1))
        vs.index_copy_(1, t_idx, v.unsqueeze(1))
        o = _attention(q.reshape(B, Hkv, G, D), kp, vp, ks, vs, jmask, flash=flash)
    elif tsuffix is not None:  # full buffers, lengths on the device; jmask: the prompt's
        ks.index_copy_(2, t_idx, k.unsqueeze(2))
        vs.index_copy_(2, t_idx, v.unsqueeze(2))
        o = _attention(q.reshape(B, Hkv, G, D), kp, vp, ks, vs, jmask, tsuffix=tsuffix)
    else:
        ks.index_copy_(2, t_idx, k.unsqueeze(2))
        vs.index_copy_(2, t_idx, v.unsqueeze(2))
        span = jmask.shape[0] - kp.shape[1]
        o = _attention(q.reshape(B, Hkv, G, D), kp, vp, ks[:, :, :span], vs[:, :, :span], jmask, cuda_attn)
    x = x + F.linear(o, w_o)
    h = F.rms_norm(x, (x.shape[-1],), n2, eps)
    g_, u_ = F.linear(h, w_gu).chunk(2, dim=-1)
    return x + F.linear(F.silu(g_) * u_, w_down)


class SharedPrefixDecoder:
    """Llama-family decode with a shared prompt cache (see the module docstring).

    Two forms of the layer math, same numbers: with peft adapters it calls the model's modules (LoRA wrappers
    apply); without, q/k/v and gate/up run as single fused matrix products (the modules' weights become views
    into the fused tensors, so nothing is duplicated and the HF forward still sees the same weights). On CUDA the
    attention is two fused kernels (prompt, suffix) merged by their log-sum-exps; with `graphs`, the decode step
    is captured once per (rows, capacity, prompt length) and replayed, also across requests.
    """

    name = "shared_prefix"

    def __init__(self, model, graphs: bool = False, compile: bool = False):
        ok, why = fast_path_supported(model)
        if not ok:
            raise ValueError(f"shared-prefix decoding not supported: {why}")
        self.model = model
        self.lm = _causal_lm(model)
        cfg = self.lm.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        att = self.lm.model.layers[0].self_attn
        self.head_dim = att.head_dim
        self.scaling = att.scaling
        self.graphs = graphs
        self.compile = compile or os.environ.get("TOMTRANSFER_COMPILE") == "1"
        self.peft = model is not self.lm
        # fused q/k/v and gate/up weights (one product each): on CUDA by default (fewer, larger kernels, and what the
        # graphs and the compiled layer use); off on CPU, where the concatenated copies would sit beside the
        # memory-mapped originals (+0.9 GB resident for Qwen2.5-0.5B) for no measurable speed. TOMTRANSFER_FUSE=0/1.
        env_fuse = os.environ.get("TOMTRANSFER_FUSE")
        want_fuse = (env_fuse == "1") if env_fuse in ("0", "1") else self.lm.device.type == "cuda"
        self.fused = None if self.peft or not want_fuse else self._fuse()
        self.cuda_attn = False
        self._pool: "dict[tuple, _Graph]" = {}
        # PyTorch's memory-efficient attention kernel measured slower than the plain matrix products for this
        # decode shape (one query per row) on an H200, so it is opt-in: TOMTRANSFER_CUDA_ATTN=1.
        if self.lm.device.type == "cuda" and os.environ.get("TOMTRANSFER_CUDA_ATTN") == "1":
            self.cuda_attn = self._check_cuda_attention()
        # suffix attention by PyTorch's flash kernel with per-row lengths (exact spans, no mask, one graph for all
        # steps). Opt-in (TOMTRANSFER_FLASH_SUFFIX=1, used only if it runs and agrees with the plain math): with one
        # query per row it measured ~3x slower than the plain matrix products on an H200 (218 vs 75 us per layer).
        # Buffers are then (B, cap, Hkv, D) instead of (B, Hkv, cap, D).
        self.flash = (self.lm.device.type == "cuda" and not self.cuda_attn
                      and os.environ.get("TOMTRANSFER_FLASH_SUFFIX") == "1" and self._check_flash())
        self.sdim = 1 if self.flash else 2  # the slot dimension of the suffix buffers
        # suffix attention by a Triton kernel with the exact per-step length (`_triton_suffix_op`; K/V read once,
        # no span padding, one graph for all steps), used only if it runs and agrees with the plain math. Default:
        # on with the compiled layer (H200: 0.76 -> 0.68 s on the GPU benchmark), off without it (there the extra
        # log-sum-exp merge kernels cost more than the kernel saves: 0.91 -> 0.94 s); TOMTRANSFER_TRITON_SUFFIX=0/1.
        env_triton = os.environ.get("TOMTRANSFER_TRITON_SUFFIX")
        want_triton = (env_triton == "1") if env_triton in ("0", "1") else (
            graphs and self.fused is not None and self.compile)
        self.triton_suffix = (self.lm.device.type == "cuda" and not self.cuda_attn and not self.flash
                              and want_triton and self._check_triton())
        self.span_bucket = int(os.environ.get("TOMTRANSFER_SPAN_BUCKET", "16"))
        # graph shapes use the prompt length rounded up to this (the padding is masked), so one captured graph (and
        # one compiled layer) serves every prompt of that bucket instead of one per exact length
        self.prompt_bucket = max(1, int(os.environ.get("TOMTRANSFER_PROMPT_BUCKET", "64")))
        self.pool_size = max(1, int(os.environ.get("TOMTRANSFER_GRAPH_POOL", "4")))
        # the prompt forward as a CUDA graph too (fused weights only), per prompt bucket, for prompts up to this
        self.graph_prefill_max = int(os.environ.get("TOMTRANSFER_GRAPH_PREFILL_MAX", "1024"))
        self._prefill_pool: "dict[int, _PrefillGraph]" = {}
        self._layer = None  # compiled `_fused_layer` for graph steps (opt-in)
        self.compiled_cuda_attn = True  # inside the compiled layer too, when TOMTRANSFER_CUDA_ATTN=1
        if (graphs and self.fused is not None and self.compile
                and self.lm.config.hidden_act == "silu" and self.lm.model.layers[0].self_attn.o_proj.bias is None):
            import torch._dynamo

            # one specialisation per (rows, prompt length, span bucket): allow plenty before falling back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self._layer = torch.compile(_fused_layer, dynamic=False)

    # ---------------------------------------------------------------------------------------- setup
    @torch.no_grad()
    def _fuse(self):
        fused = []
        for layer in self.lm.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            projs = [att.q_proj, att.k_proj, att.v_proj]
            if not all(_is_plain_linear(m) for m in (*projs, mlp.gate_proj, mlp.up_proj)):
                return None
            w = torch.cat([m.weight for m in projs])
            bias = torch.cat([m.bias for m in projs]) if projs[0].bias is not None else None
            start = 0
            for m in projs:
                n = m.weight.shape[0]
                m.weight = torch.nn.Parameter(w[start:start + n], requires_grad=False)
                if bias is not None:
                    m.bias = torch.nn.Parameter(bias[start:start + n], requires_grad=False)
                start += n
            gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            n = mlp.gate_proj.weight.shape[0]
            mlp.gate_proj.weight = torch.nn.Parameter(gu[:n], requires_grad=False)
            mlp.up_proj.weight = torch.nn.Parameter(gu[n:], requires_grad=False)
            fused.append((w, bias, gu))
        return fused

    def _check_cuda_attention(self) -> bool:
        """Use the fused CUDA attention only if it runs here and agrees with the plain math."""
        try:
            dev, dt = self.lm.device, self.lm.dtype
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(2, self.n_kv, 3, self.head_dim, device=dev, dtype=dt, generator=g) * self.head_dim ** -0.5
            k = torch.randn(2, self.n_kv, 16, self.head_dim, device=dev, dtype=dt, generator=g)
            v = torch.randn(2, self.n_kv, 16, self.head_dim, device=dev, dtype=dt, generator=g)
            mask = torch.arange(16, device=dev) < 11
            bias = torch.zeros(16, device=dev, dtype=dt).masked_fill(~mask, float("-inf")).view(1, 1, 1, 16)
            o1, l1 = _attn_lse_cuda(q, k, v, bias.expand(2, self.n_kv, 3, 16))
            o2, l2 = _attn_lse_manual(q, k, v, mask)
            ok = torch.allclose(o1.float(), o2.float(), atol=5e-2, rtol=5e-2) and torch.allclose(l1, l2, atol=5e-2)
            return bool(ok)
        except Exception:  # noqa: BLE001 - any failure: use the plain math
            return False

    def _probe_qkv(self, B: int, cap: int, slots_first: bool):
        """Seeded random inputs for a kernel check: one scaled query per row, (B, Hkv, G, D), and K/V laid out
        (B, cap, Hkv, D) when `slots_first` (the flash buffers) else (B, Hkv, cap, D)."""
        dev, dt = self.lm.device, self.lm.dtype
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, self.n_kv, self.group, self.head_dim, device=dev, dtype=dt, generator=g)
        q = q * self.head_dim ** -0.5
        shape = (B, cap, self.n_kv, self.head_dim) if slots_first else (B, self.n_kv, cap, self.head_dim)
        k = torch.randn(shape, device=dev, dtype=dt, generator=g)
        v = torch.randn(shape, device=dev, dtype=dt, generator=g)
        return q, k, v

    def _check_flash(self) -> bool:
        """Use the flash suffix kernel only if it runs here (dtype, head size) and agrees with the plain math."""
        try:
            dev = self.lm.device
            B, cap, used = 3, 16, 11
            q, k, v = self._probe_qkv(B, cap, slots_first=True)
            flash = self._flash_args(B, cap, torch.full((1,), used, device=dev))
            H = self.n_kv * self.group
            raw = torch.ops.aten._flash_attention_forward(
                q.reshape(B, H, self.head_dim), k.view(B * cap, self.n_kv, -1), v.view(B * cap, self.n_kv, -1),
                flash[0], flash[1], 1, cap, 0.0, False, False, scale=1.0, seqused_k=flash[2])[1]
            _FLASH_LSE_HEADS_FIRST[0] = raw.dim() == 2 and tuple(raw.shape) == (H, B) and H != B
            o1, l1 = _flash_suffix(q, k, v, flash)
            o2, l2 = _attn_lse_manual(q, k.transpose(1, 2)[:, :, :used], v.transpose(1, 2)[:, :, :used], None)
            o2 = o2.reshape(B, -1, self.head_dim)
            l2 = l2.reshape(B, -1)
            return bool(torch.allclose(o1.float(), o2.float(), atol=3e-2, rtol=3e-2)
                        and torch.allclose(l1.float(), l2.float(), atol=3e-2))
        except Exception:  # noqa: BLE001 - no flash kernel here: the plain math
            return False

    def _check_triton(self) -> bool:
        try:
            dev = self.lm.device
            B, cap, used = 3, 40, 37
            q, k, v = self._probe_qkv(B, cap, slots_first=False)
            o1, l1 = _triton_suffix_op()(q.reshape(B, -1, self.head_dim), k, v,
                                         torch.full((1,), used, device=dev), self.group)
            o2, l2 = _attn_lse_manual(q, k[:, :, :used], v[:, :, :used], None)
            o2 = o2.reshape(B, -1, self.head_dim)
            l2 = l2.reshape(B, -1)
            return bool(torch.allclose(o1.float(), o2.float(), atol=3e-2, rtol=3e-2)
                        and torch.allclose(l1.float(), l2.float(), atol=3e-2))
        except Exception as e:  # noqa: BLE001 - no Triton here: the plain math
            print(f"triton suffix attention unavailable: {type(e).__name__}: {str(e)[:300]}")
            return False

    @staticmethod
    def _flash_args(B: int, cap: int, used: torch.Tensor):
        """(cu_seq_q, cu_seq_k, seqused_k) for one query per row and row b's slots at b * cap; used: (1,) or (B,)."""
        dev = used.device
        cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32)
        return cu_q, cu_q * cap, used.to(torch.int32).expand(B).contiguous()

    def _suffix_shape(self, rows: int, capacity: int) -> tuple:
        if self.flash:
            return (rows, capacity, self.n_kv, self.head_dim)
        return (rows, self.n_kv, capacity, self.head_dim)

    # -------------------------------------------------------------------------------------- prefill
    # The model's modules are looked up at call time: peft replaces q_proj/v_proj with LoRA wrappers.
    @torch.inference_mode()
    def prefill(self, ids: list[int], past: "PromptKV | None" = None) -> Prefix:
        """`past`: the K/V of `ids[:past.length]` (a cached prompt prefix); only the rest is computed then.
        On CUDA with graphs and fused weights (no adapters) the prompt forward replays a CUDA graph captured per
        prompt bucket; the returned K/V are then views into that graph's buffers, valid until the next prefill of
        the same bucket (the engine decodes from a prefix before it prefills the next prompt)."""
        if past is None and self.whole_prompt(ids):
            return self._graph_prefill(ids)
        out = forward_prompt(self.model, ids, past)
        kv = [(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in out.past_key_values.layers]
        return Prefix(length=len(ids), logits=out.logits[0, -1].float(), kv=kv)

    def whole_prompt(self, ids: list[int]) -> bool:
        """True where the prompt forward is one captured CUDA graph: splitting it off a cached prefix would not pay."""
        return (self.graphs and self.fused is not None and self.lm.device.type == "cuda"
                and 0 < len(ids) <= self.graph_prefill_max)

    def _prefill_static(self, pg: "_PrefillGraph") -> torch.Tensor:
        """The prompt forward in static form: `pg.tokens` (bucket,) padded at the end (causal attention, so real
        positions never see the padding), K/V written into `pg.kv`, returns the logits after position `pg.last`.
        Same math as the model's forward (fused q/k/v and gate/up, PyTorch SDPA, causal)."""
        F = torch.nn.functional
        lm = self.lm
        Hkv, G, D = self.n_kv, self.group, self.head_dim
        H = Hkv * G
        Lb = pg.tokens.shape[0]
        x = lm.model.embed_tokens(pg.tokens)  # (Lb, hidden)
        cos, sin = lm.model.rotary_emb(x, torch.arange(Lb, device=x.device).view(1, Lb))
        h2 = D // 2
        cos = cos.view(Lb, 1, D)
        sin = sin.view(Lb, D)
        sin_s = torch.cat((-sin[:, :h2], sin[:, h2:]), dim=-1).view(Lb, 1, D)
        for i, layer in enumerate(lm.model.layers):
            att = layer.self_attn
            w, b, gu = self.fused[i]
            h = self._norm(layer.input_layernorm, x)
            qkv = F.linear(h, w, b).view(Lb, H + 2 * Hkv, D)
            qk = _rope_apply(qkv[:, : H + Hkv], cos, sin_s)
            kb, vb = pg.kv[i]
            kb.copy_(qk[:, H:].transpose(0, 1))
            vb.copy_(qkv[:, H + Hkv:].transpose(0, 1))
            o = F.scaled_dot_product_attention(qk[:, :H].transpose(0, 1).unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0),
                                               is_causal=True, scale=self.scaling, enable_gqa=G > 1)
            x = x + att.o_proj(o[0].transpose(0, 1).reshape(Lb, H * D))
            h = self._norm(layer.post_attention_layernorm, x)
            g_, u_ = F.linear(h, gu).chunk(2, dim=-1)
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(g_) * u_)
        last = self._norm(lm.model.norm, x.index_select(0, pg.last))
        return lm.lm_head(last)[0].float()

    def _prefill_buffers(self, ids: list[int]) -> "_PrefillGraph":
        L = len(ids)
        Lb = -(-L // self.prompt_bucket) * self.prompt_bucket
        pg = self._prefill_pool.get(Lb)
        dev, dt = self.lm.device, self.lm.dtype
        if pg is None:
            while len(self._prefill_pool) >= 2 * self.pool_size:
                self._prefill_pool.pop(next(iter(self._prefill_pool)))
            pg = _PrefillGraph()
            pg.tokens = torch.zeros(Lb, dtype=torch.long, device=dev)
            pg.last = torch.zeros(1, dtype=torch.long, device=dev)
            pg.kv = [(torch.zeros((self.n_kv, Lb, self.head_dim), dtype=dt, device=dev),
                      torch.zeros((self.n_kv, Lb, self.head_dim), dtype=dt, device=dev)) for _ in self.lm.model.layers]
            pg.graph = pg.out = None
            self._prefill_pool[Lb] = pg
        else:
            self._prefill_pool[Lb] = self._prefill_pool.pop(Lb)
        pg.tokens.copy_(torch.tensor(list(ids) + [0] * (Lb - L)))
        pg.last.fill_(L - 1)
        return pg

    def _graph_prefill(self, ids: list[int]) -> Prefix:
        pg = self._prefill_buffers(ids)
        if pg.graph is None:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._prefill_static(pg)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                pg.out = self._prefill_static(pg)
            pg.graph = graph
        pg.graph.replay()
        L = len(ids)
        return Prefix(length=L, logits=pg.out.clone(), kv=[(k[:, :L], v[:, :L]) for k, v in pg.kv])

    def start(self, prefix: Prefix, rows: int, capacity: int, graph: bool = True) -> State:
        """`graph=False`: never a CUDA graph for this batch (short or irregular work such as exact mode)."""
        if graph and self.graphs and self.lm.device.type == "cuda":
            g = self._pooled(rows, capacity, prefix)
            return State(prefix=g.prefix, rows=rows, capacity=capacity, ks=g.ks, vs=g.vs, graph=g)
        k0 = prefix.kv[0][0]
        shape = self._suffix_shape(rows, capacity)
        ks = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
        vs = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
        return State(prefix=prefix, rows=rows, capacity=capacity, ks=ks, vs=vs)

    def _pooled(self, rows: int, capacity: int, prefix: Prefix) -> "_Graph":
        """Static buffers (and, once captured, the graph) for this shape; the prompt's K/V copied in."""
        L = prefix.length
        Lb = -(-L // self.prompt_bucket) * self.prompt_bucket
        key = (rows, capacity, Lb)
        g = self._pool.get(key)
        k0 = prefix.kv[0][0]
        if g is None:
            while len(self._pool) >= self.pool_size:  # bound the memory held by idle shapes
                self._pool.pop(next(iter(self._pool)))
            shape = self._suffix_shape(rows, capacity)
            g = _Graph()
            g.ks = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
            g.vs = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
            pshape = (self.n_kv, Lb, self.head_dim)  # zero padding: finite, and masked out
            g.prefix = Prefix(length=L, logits=prefix.logits,
                              kv=[(torch.zeros(pshape, dtype=k0.dtype, device=k0.device),
                                   torch.zeros(pshape, dtype=k0.dtype, device=k0.device)) for _ in prefix.kv])
            g.tokens = torch.zeros(rows, dtype=torch.long, device=k0.device)
            g.t = torch.zeros(1, dtype=torch.long, device=k0.device)
            g.plen = torch.zeros(1, dtype=torch.long, device=k0.device)
            g.pmask = torch.zeros(Lb, dtype=torch.bool, device=k0.device)
            g.graphs = {}
            self._pool[key] = g
        else:
            self._pool[key] = self._pool.pop(key)  # most recently used last
        if prefix is not g.prefix:
            for (sk, sv), (k, v) in zip(g.prefix.kv, prefix.kv):
                sk[:, :L].copy_(k[:, :L])
                sv[:, :L].copy_(v[:, :L])
            g.prefix.length, g.prefix.logits = L, prefix.logits
        g.plen.fill_(L)
        g.pmask.copy_(torch.arange(Lb, device=k0.device) < L)
        return g

    def select(self, state: State, index: torch.Tensor) -> None:
        index = index.to(state.ks[0].device)
        t = state.t
        rows = int(index.numel())
        if state.graph is not None:  # move into the pooled buffers of the new shape
            g = self._pooled(rows, state.capacity, state.prefix)
            if t:
                for dst, src in zip(g.ks + g.vs, state.ks + state.vs):
                    dst.narrow(self.sdim, 0, t).copy_(src.narrow(self.sdim, 0, t).index_select(0, index))
            state.ks, state.vs, state.prefix, state.graph = g.ks, g.vs, g.prefix, g
        elif t == 0:  # nothing written yet: just resize
            shape = (rows, *state.ks[0].shape[1:])
            state.ks = [torch.zeros(shape, dtype=k.dtype, device=k.device) for k in state.ks]
            state.vs = [torch.zeros(shape, dtype=v.dtype, device=v.device) for v in state.vs]
        else:  # copy only the filled part of the suffix buffers
            def pick(buf):
                out = torch.empty((rows, *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
                out.narrow(self.sdim, 0, t).copy_(buf.narrow(self.sdim, 0, t).index_select(0, index))
                return out
            state.ks = [pick(k) for k in state.ks]
            state.vs = [pick(v) for v in state.vs]
        state.rows = rows

    # ---------------------------------------------------------------------------------------- step
    def _rope(self, x_like: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_s), each (1, 1, D); sin_s has the sign of rotate_half folded in (see `_rope_apply`)."""
        cos, sin = self.lm.model.rotary_emb(x_like, position.view(1, 1))
        h = sin.shape[-1] // 2
        sin = sin.reshape(-1)
        return cos.view(1, 1, -1), torch.cat((-sin[:h], sin[h:])).view(1, 1, -1)

    @staticmethod
    def _norm(norm, x):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)

    def _forward(self, state: State, tokens: torch.Tensor, t: int | torch.Tensor, static: bool,
                 span: int | None = None) -> torch.Tensor:
        """One decode step. `static`: attend to the first `span` (default: all) suffix slots with a mask, the step
        index a device tensor (graph-capturable), instead of slicing to t + 1."""
        lm = self.lm
        B, Hkv, G, D = tokens.shape[0], self.n_kv, self.group, self.head_dim
        H = Hkv * G
        x = lm.model.embed_tokens(tokens)  # (B, hidden)
        L = state.prefix.length
        pmask = None
        if static:
            t_idx = t  # (1,) long tensor on device
            if state.graph is not None:  # pooled buffers: the prompt is padded to a bucket, its length on device
                pos = t_idx + state.graph.plen
                pmask = state.graph.pmask
            else:
                pos = t_idx + L
            span = span or state.capacity
            mask = torch.arange(span, device=x.device) <= t_idx  # (span,)
        else:
            pos = torch.tensor([L + t], device=x.device)
            span = t + 1
            mask = None
        cos, sin_s = self._rope(x, pos)
        jmask = None  # over [prompt (bucket), suffix span]; None: everything attended
        flash = tsuffix = None
        if self.triton_suffix:
            jmask = pmask
            tsuffix = (t_idx + 1) if static else torch.full((1,), t + 1, device=x.device)
        elif self.flash:  # the suffix by lengths, not a mask: jmask is the prompt's only
            jmask = pmask
            used = (t_idx + 1) if static else torch.full((1,), t + 1, device=x.device)
            flash = self._flash_args(B, state.capacity, used)
        elif static:
            jmask = torch.cat((pmask if pmask is not None else torch.ones(L, dtype=torch.bool, device=x.device), mask))
        cuda_attn = self.cuda_attn
        for i, layer in enumerate(lm.model.layers):
            att = layer.self_attn
            if static and self._layer is not None:
                w, b, gu = self.fused[i]
                kp, vp = state.prefix.kv[i]
                x = self._layer(x, w, b, att.o_proj.weight, gu, layer.mlp.down_proj.weight, layer.input_layernorm.weight,
                                layer.post_attention_layernorm.weight, layer.input_layernorm.variance_epsilon, cos,
                                sin_s, kp, vp, state.ks[i], state.vs[i], t_idx, jmask, H, Hkv, G, D, self.scaling,
                                cuda_attn and self.compiled_cuda_attn, flash, tsuffix)
                continue
            h = self._norm(layer.input_layernorm, x)
            if self.fused is not None:
                w, b, gu = self.fused[i]
                qkv = torch.nn.functional.linear(h, w, b).view(B, H + 2 * Hkv, D)
                qk = _rope_apply(qkv[:, : H + Hkv], cos, sin_s)
                q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
            else:
                q = _rope_apply(att.q_proj(h).view(B, H, D), cos, sin_s)
                k = _rope_apply(att.k_proj(h).view(B, Hkv, D), cos, sin_s)
                v = att.v_proj(h).view(B, Hkv, D)
            q = q * self.scaling
            ks, vs = state.ks[i], state.vs[i]
            sd = self.sdim
            if static:
                ks.index_copy_(sd, t_idx, k.unsqueeze(sd))
                vs.index_copy_(sd, t_idx, v.unsqueeze(sd))
            else:
                ks.select(sd, t).copy_(k)
                vs.select(sd, t).copy_(v)
            kp, vp = state.prefix.kv[i]  # (Hkv, L or bucket, D)
            if flash is not None or tsuffix is not None:
                o = _attention(q.reshape(B, Hkv, G, D), kp, vp, ks, vs, jmask, flash=flash, tsuffix=tsuffix)
            else:
                o = _attention(q.reshape(B, Hkv, G, D), kp, vp, ks[:, :, :span], vs[:, :, :span], jmask, cuda_attn)
            x = x + att.o_proj(o)
            h = self._norm(layer.post_attention_layernorm, x)
            if self.fused is not None:
                g_, u_ = torch.nn.functional.linear(h, gu).chunk(2, dim=-1)
                x = x + layer.mlp.down_proj(layer.mlp.act_fn(g_) * u_)
            else:
                x = x + layer.mlp(h)
        x = self._norm(lm.model.norm, x)
        return lm.lm_head(x).float()

    @torch.inference_mode()
    def step(self, state: State, tokens: torch.Tensor, borrow: bool = False) -> torch.Tensor:
        """`borrow`: on the graph path, return the graph's own logits buffer (valid until the next step) instead of
        a copy; for callers that consume the logits before stepping again."""
        if state.t >= state.capacity:
            raise RuntimeError("decode capacity exceeded")
        tokens = tokens.to(state.ks[0].device)
        if state.graph is not None and tokens.is_cuda:
            logits = self._graph_step(state, tokens, borrow)
        else:
            logits = self._forward(state, tokens, state.t, static=False)
        state.t += 1
        return logits

    def _graph_step(self, state: State, tokens: torch.Tensor, borrow: bool = False) -> torch.Tensor:
        """Replay the captured step for this shape and span bucket (captured on first use, kept in the pool)."""
        g = state.graph
        g.tokens.copy_(tokens)
        g.t.fill_(state.t)
        b = max(1, self.span_bucket)
        # with the flash suffix kernel the lengths live on the device: one graph for all steps
        whole = self.flash or self.triton_suffix
        span = state.capacity if whole else min(state.capacity, -(-(state.t + 1) // b) * b)
        if span not in g.graphs:
            # warm up on a side stream (required before capture), then capture one static step
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                # warm-up steps write this step's slot, which the replay below rewrites identically
                for _ in range(2):
                    self._forward(state, g.tokens, g.t, static=True, span=span)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward(state, g.tokens, g.t, static=True, span=span)
            g.graphs[span] = (graph, out)
        graph, out = g.graphs[span]
        graph.replay()
        return out if borrow else out.clone()


class _Graph:
    """Static buffers of one decode shape and the CUDA graph of its step (captured on first use)."""

    tokens: torch.Tensor
    t: torch.Tensor
    graphs: dict  # span bucket -> (CUDAGraph, output tensor)
    prefix: Prefix  # K/V padded to the prompt bucket
    plen: torch.Tensor  # (1,) the prompt's real length
    pmask: torch.Tensor  # (bucket,) True for real prompt positions
    ks: list
    vs: list


class _PrefillGraph:
    """Static buffers of one prompt bucket's forward and its CUDA graph."""

    tokens: torch.Tensor  # (bucket,) prompt ids, zero-padded
    last: torch.Tensor  # (1,) index of the last real position
    kv: list  # per layer (Hkv, bucket, D) K and V
    graph: object
    out: torch.Tensor | None


def make_decoder(model, prefer_fast: bool = True, graphs: bool = False, compile: bool = False):
    if prefer_fast:
        ok, _ = fast_path_supported(model)
        if ok:
            return SharedPrefixDecoder(model, graphs=graphs, compile=compile)
    return HFDecoder(model)
