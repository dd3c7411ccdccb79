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

Both score blocks go through ONE softmax over their concatenation (`decoder_ops.shared_prefix_attention`). Without
adapters on CUDA, q/k/v and gate/up run as fused matrix products. The step also has a static form (masked full
buffers, the step index a device tensor) that the CUDA fast path (`cuda_fastpath.py`: CUDA graphs, `torch.compile`,
a Triton suffix kernel) captures by overriding the hooks `_static_prompt`, `_layer_step`, `_masks` and `_attend`;
this module knows nothing of it (the engine's `make_decoder` picks that subclass on CUDA). The tensor operations
all decoders share are in `decoder_ops.py`. The knobs are `DecodingOptions`, filled from the model's `decoding:`
section of the experiment config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from tomtransfer.services.teacher.engines.decoder_ops import cache_from, causal_lm, rope_apply, shared_prefix_attention

SUPPORTED_FAST = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class DecodingOptions:
    """The transformers engine's knobs: `ModelSpec.decoding` in shared/config.py (same names and defaults, which
    that model documents; a test keeps the two in step). A plain dataclass: the engine also runs where pydantic is
    not installed (the GPU benchmarks)."""

    fast: bool = True
    kv_budget_mb: float | None = None
    prefix_cache_mb: float = 256.0
    device_loop: bool | None = None
    cuda_graphs: bool = True
    compile: bool = False
    span_bucket: int = 16
    prompt_bucket: int = 64
    graph_pool: int = 4
    graph_prefill_max: int = 1024

    @classmethod
    def of(cls, spec) -> "DecodingOptions":
        """The options of a model spec (its `decoding` attribute; the defaults where it has none)."""
        knobs = getattr(spec, "decoding", None)
        if knobs is None:
            return cls()
        return cls(**{f.name: getattr(knobs, f.name) for f in fields(cls) if hasattr(knobs, f.name)})


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


@dataclass(frozen=True)
class PromptKV:
    """The K/V of a prompt prefix for batch 1: per layer (1, Hkv, length, D) keys and values. Never modified:
    a forward that continues from it builds a fresh cache around the same tensors."""

    length: int
    layers: tuple

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def forward_prompt(model, ids: list[int], past: PromptKV | None = None):
    """The prompt forward (logits of the last position only: the LM head over every prompt position was ~30 % of
    a Qwen2.5-0.5B prefill on CPU), continuing from `past` (the K/V of `ids[:past.length]`) when given."""
    dev = model.device
    if past is None:
        return model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1)
    if len(ids) <= past.length:
        raise ValueError("a cached prefix must leave at least one prompt token to compute")
    return model(input_ids=torch.tensor([ids[past.length:]], device=dev), past_key_values=cache_from(past),
                 use_cache=True, logits_to_keep=1)


def prompt_kv(model, ids: list[int]) -> PromptKV:
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True, logits_to_keep=1)
    return PromptKV(length=len(ids), layers=tuple((layer.keys, layer.values) for layer in out.past_key_values.layers))


def fast_path_supported(model) -> tuple[bool, str]:
    lm = causal_lm(model)
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


def _is_plain_linear(m) -> bool:
    return type(m) is torch.nn.Linear


class SharedPrefixDecoder:
    """Llama-family decode with a shared prompt cache (see the module docstring); the CPU path, and eager CUDA.

    Two forms of the layer math, same numbers: with peft adapters it calls the model's modules (LoRA wrappers
    apply); with fused weights, q/k/v and gate/up run as single matrix products (the modules' weights become views
    into the fused tensors, so nothing is duplicated and the HF forward still sees the same weights).
    """

    name = "shared_prefix"

    def __init__(self, model, fuse: bool | None = None):
        ok, why = fast_path_supported(model)
        if not ok:
            raise ValueError(f"shared-prefix decoding not supported: {why}")
        self.model = model
        self.lm = causal_lm(model)
        cfg = self.lm.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        att = self.lm.model.layers[0].self_attn
        self.head_dim = att.head_dim
        self.scaling = att.scaling
        self.peft = model is not self.lm
        # fused q/k/v and gate/up weights (one product each): on CUDA (fewer, larger kernels, and what the graphs
        # and the compiled layer use); not on CPU, where the concatenated copies would sit beside the memory-mapped
        # originals (+0.9 GB resident for Qwen2.5-0.5B) for no measurable speed. `fuse` overrides (tests).
        want_fuse = self.lm.device.type == "cuda" if fuse is None else fuse
        self.fused = None if self.peft or not want_fuse else self._fuse()

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

    def _suffix_shape(self, rows: int, capacity: int) -> tuple:
        return (rows, self.n_kv, capacity, self.head_dim)

    # -------------------------------------------------------------------------------------- prefill
    # The model's modules are looked up at call time: peft replaces q_proj/v_proj with LoRA wrappers.
    @torch.inference_mode()
    def prefill(self, ids: list[int], past: "PromptKV | None" = None) -> Prefix:
        """`past`: the K/V of `ids[:past.length]` (a cached prompt prefix); only the rest is computed then."""
        out = forward_prompt(self.model, ids, past)
        kv = [(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in out.past_key_values.layers]
        return Prefix(length=len(ids), logits=out.logits[0, -1].float(), kv=kv)

    def whole_prompt(self, ids: list[int]) -> bool:
        """True where the prompt forward is one captured CUDA graph (never here; see the CUDA subclass)."""
        return False

    def start(self, prefix: Prefix, rows: int, capacity: int, graph: bool = True) -> State:
        """`graph`: may the batch use a captured CUDA graph (the CUDA subclass; ignored here)."""
        k0 = prefix.kv[0][0]
        shape = self._suffix_shape(rows, capacity)
        ks = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
        vs = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in prefix.kv]
        return State(prefix=prefix, rows=rows, capacity=capacity, ks=ks, vs=vs)

    def select(self, state: State, index: torch.Tensor) -> None:
        index = index.to(state.ks[0].device)
        t = state.t
        rows = int(index.numel())
        if t == 0:  # nothing written yet: just resize
            shape = (rows, *state.ks[0].shape[1:])
            state.ks = [torch.zeros(shape, dtype=k.dtype, device=k.device) for k in state.ks]
            state.vs = [torch.zeros(shape, dtype=v.dtype, device=v.device) for v in state.vs]
        else:  # copy only the filled part of the suffix buffers
            def pick(buf):
                out = torch.empty((rows, *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
                out.narrow(2, 0, t).copy_(buf.narrow(2, 0, t).index_select(0, index))
                return out
            state.ks = [pick(k) for k in state.ks]
            state.vs = [pick(v) for v in state.vs]
        state.rows = rows

    # ---------------------------------------------------------------------------------------- step
    def _rope(self, x_like: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_s), each (1, 1, D); sin_s has the sign of rotate_half folded in (see `rope_apply`)."""
        cos, sin = self.lm.model.rotary_emb(x_like, position.view(1, 1))
        h = sin.shape[-1] // 2
        sin = sin.reshape(-1)
        return cos.view(1, 1, -1), torch.cat((-sin[:h], sin[h:])).view(1, 1, -1)

    @staticmethod
    def _norm(norm, x):
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)

    def _masks(self, static: bool, t, pmask, mask, L: int, device) -> tuple:
        """(jmask over [prompt (bucket), suffix span] or None for everything attended, `used`: the suffix slots in
        use as a device tensor for a length-aware suffix kernel, None here)."""
        if not static:
            return None, None
        return torch.cat((pmask if pmask is not None else torch.ones(L, dtype=torch.bool, device=device), mask)), None

    def _attend(self, qg, kp, vp, ks, vs, jmask, span: int, used):
        return shared_prefix_attention(qg, kp, vp, ks[:, :, :span], vs[:, :, :span], jmask)

    def _static_prompt(self, state: State, t: torch.Tensor) -> tuple:
        """Static form: (the fed token's position, the prompt's mask or None: every prompt position is real)."""
        return t + state.prefix.length, None

    def _forward(self, state: State, tokens: torch.Tensor, t: int | torch.Tensor, static: bool,
                 span: int | None = None) -> torch.Tensor:
        """One decode step. `static`: attend to the first `span` (default: all) suffix slots with a mask, the step
        index a device tensor (graph-capturable), instead of slicing to t + 1."""
        lm = self.lm
        x = lm.model.embed_tokens(tokens)  # (B, hidden)
        L = state.prefix.length
        pmask = mask = None
        if static:  # t: a (1,) long tensor on the device
            pos, pmask = self._static_prompt(state, t)
            span = span or state.capacity
            mask = torch.arange(span, device=x.device) <= t  # (span,)
        else:
            pos = torch.tensor([L + t], device=x.device)
            span = t + 1
        cos, sin_s = self._rope(x, pos)
        jmask, used = self._masks(static, t, pmask, mask, L, x.device)
        for i in range(len(lm.model.layers)):
            x = self._layer_step(i, x, cos, sin_s, state, t, static, jmask, span, used)
        x = self._norm(lm.model.norm, x)
        return lm.lm_head(x).float()

    def _layer_step(self, i: int, x: torch.Tensor, cos, sin_s, state: State, t, static: bool, jmask, span: int,
                    used) -> torch.Tensor:
        """Decoder layer `i` of one step: the token's K/V into suffix slot t, attention, MLP; the new hidden state."""
        layer = self.lm.model.layers[i]
        att = layer.self_attn
        B, Hkv, G, D = x.shape[0], self.n_kv, self.group, self.head_dim
        H = Hkv * G
        h = self._norm(layer.input_layernorm, x)
        if self.fused is not None:
            w, b, gu = self.fused[i]
            qkv = torch.nn.functional.linear(h, w, b).view(B, H + 2 * Hkv, D)
            qk = rope_apply(qkv[:, : H + Hkv], cos, sin_s)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        else:
            q = rope_apply(att.q_proj(h).view(B, H, D), cos, sin_s)
            k = rope_apply(att.k_proj(h).view(B, Hkv, D), cos, sin_s)
            v = att.v_proj(h).view(B, Hkv, D)
        q = q * self.scaling
        ks, vs = state.ks[i], state.vs[i]
        if static:
            ks.index_copy_(2, t, k.unsqueeze(2))
            vs.index_copy_(2, t, v.unsqueeze(2))
        else:
            ks.select(2, t).copy_(k)
            vs.select(2, t).copy_(v)
        kp, vp = state.prefix.kv[i]  # (Hkv, L or bucket, D)
        o = self._attend(q.reshape(B, Hkv, G, D), kp, vp, ks, vs, jmask, span, used)
        x = x + att.o_proj(o)
        h = self._norm(layer.post_attention_layernorm, x)
        if self.fused is not None:
            g_, u_ = torch.nn.functional.linear(h, gu).chunk(2, dim=-1)
            return x + layer.mlp.down_proj(layer.mlp.act_fn(g_) * u_)
        return x + layer.mlp(h)

    @torch.inference_mode()
    def step(self, state: State, tokens: torch.Tensor, borrow: bool = False) -> torch.Tensor:
        """`borrow`: the caller consumes the logits before stepping again, so a decoder may return a buffer of its
        own (valid until the next step: the CUDA subclass's graph path) instead of a copy; ignored here."""
        if state.t >= state.capacity:
            raise RuntimeError("decode capacity exceeded")
        logits = self._step_logits(state, tokens.to(state.ks[0].device), borrow)
        state.t += 1
        return logits

    def _step_logits(self, state: State, tokens: torch.Tensor, borrow: bool) -> torch.Tensor:
        return self._forward(state, tokens, state.t, static=False)
