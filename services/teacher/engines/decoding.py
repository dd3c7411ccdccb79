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

The two partial attentions are merged by their log-sum-exps. Without adapters q/k/v and gate/up run as fused
matrix products. On CUDA the decode step is captured as a CUDA graph (`graphs=True`) per (rows, capacity,
prompt length, suffix-span bucket), kept in a small pool and replayed across requests: static shapes (the
suffix is masked up to the bucket, not sliced), the step index lives in a device tensor, sampling stays
outside the graph. `TOMTRANSFER_COMPILE=1` additionally compiles the fused layer (`_fused_layer`).
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
    def prefill(self, ids: list[int]) -> Prefix:
        dev = self.model.device
        x = torch.tensor([ids], device=dev)
        out = self.model(input_ids=x, use_cache=True)
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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


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


def _fused_layer(x, w_qkv, b_qkv, w_o, w_gu, w_down, n1, n2, eps: float, cos, sin, kp, vp, ks, vs, t_idx, mask,
                 H: int, Hkv: int, G: int, D: int, scaling: float, cuda_attn: bool = False):
    """One decoder layer, static (graph) form, fused weights, plain attention math: a pure function of tensors, so
    one `torch.compile` serves every layer (TOMTRANSFER_COMPILE=1)."""
    F = torch.nn.functional
    B = x.shape[0]
    h = F.rms_norm(x, (x.shape[-1],), n1, eps)
    qkv = F.linear(h, w_qkv, b_qkv).view(B, H + 2 * Hkv, D)
    qk = qkv[:, : H + Hkv]
    qk = qk * cos + _rotate_half(qk) * sin
    q, k, v = qk[:, :H] * scaling, qk[:, H:], qkv[:, H + Hkv:]
    ks.index_copy_(2, t_idx, k.unsqueeze(2))
    vs.index_copy_(2, t_idx, v.unsqueeze(2))
    span = mask.shape[0]
    qg = q.reshape(B, Hkv, G, D)
    qp = qg.permute(1, 0, 2, 3).reshape(1, Hkv, B * G, D)
    if cuda_attn:
        bias = torch.zeros(span, device=x.device, dtype=x.dtype).masked_fill(~mask, float("-inf"))
        op, lp = _attn_lse_cuda(qp, kp.unsqueeze(0), vp.unsqueeze(0), None)
        os_, ls = _attn_lse_cuda(qg, ks[:, :, :span], vs[:, :, :span], bias.view(1, 1, 1, span).expand(B, Hkv, G, span))
    else:
        op, lp = _attn_lse_manual(qp, kp.unsqueeze(0), vp.unsqueeze(0), None)
        os_, ls = _attn_lse_manual(qg, ks[:, :, :span], vs[:, :, :span], mask)
    op = op.view(Hkv, B, G, D).permute(1, 0, 2, 3)
    lp = lp.view(Hkv, B, G).permute(1, 0, 2)
    m = torch.maximum(lp, ls)
    wp, ws = torch.exp(lp - m).unsqueeze(-1), torch.exp(ls - m).unsqueeze(-1)
    o = ((op.float() * wp + os_.float() * ws) / (wp + ws)).to(x.dtype).reshape(B, H * D)
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

    def __init__(self, model, graphs: bool = False):
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
        self.peft = model is not self.lm
        self.fused = None if self.peft else self._fuse()
        self.cuda_attn = False
        self._pool: "dict[tuple, _Graph]" = {}
        # PyTorch's memory-efficient attention kernel measured slower than the plain matrix products for this
        # decode shape (one query per row) on an H200, so it is opt-in: TOMTRANSFER_CUDA_ATTN=1.
        if self.lm.device.type == "cuda" and os.environ.get("TOMTRANSFER_CUDA_ATTN") == "1":
            self.cuda_attn = self._check_cuda_attention()
        self.span_bucket = int(os.environ.get("TOMTRANSFER_SPAN_BUCKET", "16"))
        self._layer = None  # compiled `_fused_layer` for graph steps (opt-in)
        self.compiled_cuda_attn = True  # inside the compiled layer too, when TOMTRANSFER_CUDA_ATTN=1
        if (graphs and self.fused is not None and os.environ.get("TOMTRANSFER_COMPILE") == "1"
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

    # -------------------------------------------------------------------------------------- prefill
    # The model's modules are looked up at call time: peft replaces q_proj/v_proj with LoRA wrappers.
    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> Prefix:
        dev = self.lm.device
        out = self.model(input_ids=torch.tensor([ids], device=dev), use_cache=True)
        kv = [(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in out.past_key_values.layers]
        return Prefix(length=len(ids), logits=out.logits[0, -1].float(), kv=kv)

    def start(self, prefix: Prefix, rows: int, capacity: int, graph: bool = True) -> State:
        """`graph=False`: never a CUDA graph for this batch (short or irregular work such as exact mode)."""
        if graph and self.graphs and self.lm.device.type == "cuda":
            g = self._pooled(rows, capacity, prefix)
            return State(prefix=g.prefix, rows=rows, capacity=capacity, ks=g.ks, vs=g.vs, graph=g)
        k0 = prefix.kv[0][0]
        shape = (rows, self.n_kv, capacity, self.head_dim)
        ks = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
        vs = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
        return State(prefix=prefix, rows=rows, capacity=capacity, ks=ks, vs=vs)

    def _pooled(self, rows: int, capacity: int, prefix: Prefix) -> "_Graph":
        """Static buffers (and, once captured, the graph) for this shape; the prompt's K/V copied in."""
        key = (rows, capacity, prefix.length)
        g = self._pool.get(key)
        if g is None:
            while len(self._pool) >= 2:  # bound the memory held by idle shapes
                self._pool.pop(next(iter(self._pool)))
            k0 = prefix.kv[0][0]
            shape = (rows, self.n_kv, capacity, self.head_dim)
            g = _Graph()
            g.ks = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
            g.vs = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
            g.prefix = Prefix(length=prefix.length, logits=prefix.logits,
                              kv=[(k.clone(), v.clone()) for k, v in prefix.kv])
            g.tokens = torch.zeros(rows, dtype=torch.long, device=k0.device)
            g.t = torch.zeros(1, dtype=torch.long, device=k0.device)
            g.graphs = {}
            self._pool[key] = g
        else:
            for (sk, sv), (k, v) in zip(g.prefix.kv, prefix.kv):
                sk.copy_(k)
                sv.copy_(v)
            g.prefix.logits = prefix.logits
        return g

    def select(self, state: State, index: torch.Tensor) -> None:
        index = index.to(state.ks[0].device)
        t = state.t
        rows = int(index.numel())
        if state.graph is not None:  # move into the pooled buffers of the new shape
            g = self._pooled(rows, state.capacity, state.prefix)
            if t:
                for dst, src in zip(g.ks + g.vs, state.ks + state.vs):
                    dst[:, :, :t] = src[:, :, :t].index_select(0, index)
            state.ks, state.vs, state.prefix, state.graph = g.ks, g.vs, g.prefix, g
        elif t == 0:  # nothing written yet: just resize
            shape = (rows, *state.ks[0].shape[1:])
            state.ks = [torch.zeros(shape, dtype=k.dtype, device=k.device) for k in state.ks]
            state.vs = [torch.zeros(shape, dtype=v.dtype, device=v.device) for v in state.vs]
        else:  # copy only the filled part of the suffix buffers
            def pick(buf):
                out = torch.empty((rows, *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
                out[:, :, :t] = buf[:, :, :t].index_select(0, index)
                return out
            state.ks = [pick(k) for k in state.ks]
            state.vs = [pick(v) for v in state.vs]
        state.rows = rows

    # ---------------------------------------------------------------------------------------- step
    def _rope(self, x_like: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.lm.model.rotary_emb(x_like, position.view(1, 1))
        return cos.view(1, 1, -1), sin.view(1, 1, -1)  # (1, 1, D)

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
        if static:
            t_idx = t  # (1,) long tensor on device
            pos = t_idx + L
            span = span or state.capacity
            mask = torch.arange(span, device=x.device) <= t_idx  # (span,)
        else:
            pos = torch.tensor([L + t], device=x.device)
            span = t + 1
            mask = None
        cos, sin = self._rope(x, pos)
        bias = None
        if self.cuda_attn and mask is not None:
            bias = torch.zeros(span, device=x.device, dtype=x.dtype).masked_fill(~mask, float("-inf"))
            bias = bias.view(1, 1, 1, span).expand(B, Hkv, G, span)
        for i, layer in enumerate(lm.model.layers):
            att = layer.self_attn
            if static and self._layer is not None:
                w, b, gu = self.fused[i]
                kp, vp = state.prefix.kv[i]
                x = self._layer(x, w, b, att.o_proj.weight, gu, layer.mlp.down_proj.weight, layer.input_layernorm.weight,
                                layer.post_attention_layernorm.weight, layer.input_layernorm.variance_epsilon, cos, sin,
                                kp, vp, state.ks[i], state.vs[i], t_idx, mask, H, Hkv, G, D, self.scaling,
                                self.cuda_attn and self.compiled_cuda_attn)
                continue
            h = self._norm(layer.input_layernorm, x)
            if self.fused is not None:
                w, b, gu = self.fused[i]
                qkv = torch.nn.functional.linear(h, w, b).view(B, H + 2 * Hkv, D)
                qk = qkv[:, : H + Hkv]
                qk = qk * cos + _rotate_half(qk) * sin
                q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
            else:
                q = att.q_proj(h).view(B, H, D)
                k = att.k_proj(h).view(B, Hkv, D)
                v = att.v_proj(h).view(B, Hkv, D)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            q = q * self.scaling
            ks, vs = state.ks[i], state.vs[i]
            if static:
                ks.index_copy_(2, t_idx, k.unsqueeze(2))
                vs.index_copy_(2, t_idx, v.unsqueeze(2))
            else:
                ks[:, :, t] = k
                vs[:, :, t] = v
            kp, vp = state.prefix.kv[i]  # (Hkv, L, D)
            qg = q.reshape(B, Hkv, G, D)
            # prompt part: all rows' queries of one KV head against that head's shared prompt keys (read once)
            qp = qg.permute(1, 0, 2, 3).reshape(1, Hkv, B * G, D)
            ks_, vs_ = ks[:, :, :span], vs[:, :, :span]
            if self.cuda_attn:
                op, lp = _attn_lse_cuda(qp, kp.unsqueeze(0), vp.unsqueeze(0), None)
                os_, ls = _attn_lse_cuda(qg, ks_, vs_, bias)
            else:
                op, lp = _attn_lse_manual(qp, kp.unsqueeze(0), vp.unsqueeze(0), None)
                os_, ls = _attn_lse_manual(qg, ks_, vs_, mask)
            op = op.view(Hkv, B, G, D).permute(1, 0, 2, 3)
            lp = lp.view(Hkv, B, G).permute(1, 0, 2)
            m = torch.maximum(lp, ls)
            wp, ws = torch.exp(lp - m).unsqueeze(-1), torch.exp(ls - m).unsqueeze(-1)
            o = ((op.float() * wp + os_.float() * ws) / (wp + ws)).to(x.dtype).reshape(B, H * D)
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
    def step(self, state: State, tokens: torch.Tensor) -> torch.Tensor:
        if state.t >= state.capacity:
            raise RuntimeError("decode capacity exceeded")
        tokens = tokens.to(state.ks[0].device)
        if state.graph is not None and tokens.is_cuda:
            logits = self._graph_step(state, tokens)
        else:
            logits = self._forward(state, tokens, state.t, static=False)
        state.t += 1
        return logits

    def _graph_step(self, state: State, tokens: torch.Tensor) -> torch.Tensor:
        """Replay the captured step for this shape and span bucket (captured on first use, kept in the pool)."""
        g = state.graph
        g.tokens.copy_(tokens)
        g.t.fill_(state.t)
        b = max(1, self.span_bucket)
        span = min(state.capacity, -(-(state.t + 1) // b) * b)
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
        return out.clone()


class _Graph:
    """Static buffers of one decode shape and the CUDA graph of its step (captured on first use)."""

    tokens: torch.Tensor
    t: torch.Tensor
    graphs: dict  # span bucket -> (CUDAGraph, output tensor)
    prefix: Prefix
    ks: list
    vs: list


def make_decoder(model, prefer_fast: bool = True, graphs: bool = False):
    if prefer_fast:
        ok, _ = fast_path_supported(model)
        if ok:
            return SharedPrefixDecoder(model, graphs=graphs)
    return HFDecoder(model)
