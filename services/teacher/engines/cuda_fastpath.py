"""The CUDA fast path of the transformers engine's shared-prefix decoder: CUDA graphs, `torch.compile`, Triton.

`CudaGraphDecoder` (what the transformers engine's `make_decoder` builds on CUDA) adds to `SharedPrefixDecoder`,
through its hooks (`_static_prompt`, `_layer_step`, `_masks`, `_attend`, `_step_logits`):

- the decode step captured as a CUDA graph per (rows, capacity, prompt-length bucket, suffix-span bucket), kept
  in a small pool and replayed across requests: static shapes (the prompt padded to its bucket and the suffix to
  its span bucket, both masked), the step index and the prompt length in device tensors, sampling outside the
  graph (`cuda_graphs`, `span_bucket`, `prompt_bucket`, `graph_pool`);
- the prompt forward as a CUDA graph per prompt bucket (`_graph_prefill`, prompts up to `graph_prefill_max`);
- with `compile`: the fused layer (`fused_layer`) compiled once for every layer, the suffix attention by a Triton
  kernel that reads each row's slots in use once (`_triton_suffix_op`), merged with the prompt part by the
  log-sum-exps, and the device loop's per-step draw compiled (`compiled_draw`).

Measured on an H200 (benchmarks/RESULTS.md, 300 samples of a 7B model): graphs 0.90 s, graphs + compile + Triton
0.651 s. Variants that measured slower were removed: PyTorch's flash (1.25 s) and memory-efficient kernels for the
suffix, the Triton kernel without compile (0.93 s) or compile without it (0.73 s), other Triton block configurations
(a sweep of 48), unfused weights on CUDA. Everything here is inert on CPU (no graphs, nothing compiled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tomtransfer.services.teacher.engines.decoder_ops import rope_apply, shared_prefix_attention
from tomtransfer.services.teacher.engines.decoding import DecodingOptions, Prefix, PromptKV, SharedPrefixDecoder, State

_TRITON_OP: list = []
# the fastest of a sweep of 48 (block, warps, stages) configurations on the H200 (benchmarks/RESULTS.md)
_TRITON_CFG = {"BLOCK_S": 32, "num_warps": 1, "num_stages": 2}
# rows moved by `select` go through a temporary of at most this many bytes per copy (all layers at once when it fits)
_MOVE_CHUNK_BYTES = 256 * 2**20


@dataclass
class _PackedPrefix(Prefix):
    """A `Prefix` whose per-layer K/V are views into one tensor, `packed` (2, layers, Hkv, bucket, D): a pooled
    graph shape takes such a prompt in with ONE copy kernel instead of two per layer (64 launches from Python
    for a 32-layer model, at every `start` and every `select` to a new shape of an exact-mode expansion)."""

    packed: torch.Tensor | None = None


@dataclass
class GraphState(State):
    """A `State` decoding in pooled static buffers (`start` with graphs): the step replays their CUDA graph."""

    graph: "_Graph | None" = None


def _graph(state: State) -> "_Graph | None":
    """The pooled buffers a state decodes in; None for a plain state (the eager path)."""
    return state.graph if isinstance(state, GraphState) else None


def _attn_lse(q, k, v, mask):
    """softmax(q k^T) v and its log-sum-exp over keys; q (..., Sq, D) pre-scaled, mask (Sk,) bool or None."""
    s = torch.matmul(q, k.transpose(-1, -2)).float()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)).to(v.dtype), v)
    return out, lse


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


def _suffix_kernel_attention(qg, kp, vp, ks, vs, pmask, used):
    """`decoder_ops.shared_prefix_attention` with the suffix part by the Triton kernel over each row's first `used`
    slots of the full (B, Hkv, cap, D) buffers: the prompt part by matrix products with its log-sum-exp, the two
    merged by the log-sum-exps (weight sigmoid(lse_p - lse_s)). pmask: (prompt bucket,) or None."""
    B, Hkv, G, D = qg.shape
    qp = qg.permute(1, 0, 2, 3).reshape(Hkv, B * G, D)
    op, lp = _attn_lse(qp, kp, vp, pmask)  # (Hkv, B*G, D), (Hkv, B*G)
    os_, ls = _triton_suffix_op()(qg.reshape(B, Hkv * G, D), ks, vs, used, G)
    op = op.view(Hkv, B, G, D).permute(1, 0, 2, 3).reshape(B, Hkv * G, D)
    w = torch.sigmoid(lp.view(Hkv, B, G).permute(1, 0, 2).reshape(B, Hkv * G) - ls).unsqueeze(-1)
    return torch.lerp(os_.float(), op.float(), w).to(qg.dtype).reshape(B, Hkv * G * D)


def fused_layer(x, w_qkv, b_qkv, w_o, w_gu, w_down, n1, n2, eps: float, cos, sin_s, kp, vp, ks, vs, t_idx, jmask,
                H: int, Hkv: int, G: int, D: int, scaling: float, used=None):
    """One decoder layer, static (graph) form, fused weights: a pure function of tensors, so one `torch.compile`
    serves every layer. jmask: (prompt bucket + suffix span,), or the prompt's only with `used` (the Triton
    suffix kernel over the full buffers)."""
    F = torch.nn.functional
    B = x.shape[0]
    h = F.rms_norm(x, (x.shape[-1],), n1, eps)
    qkv = F.linear(h, w_qkv, b_qkv).view(B, H + 2 * Hkv, D)
    qk = rope_apply(qkv[:, : H + Hkv], cos, sin_s)
    q, k, v = qk[:, :H] * scaling, qk[:, H:], qkv[:, H + Hkv:]
    ks.index_copy_(2, t_idx, k.unsqueeze(2))
    vs.index_copy_(2, t_idx, v.unsqueeze(2))
    if used is not None:
        o = _suffix_kernel_attention(q.reshape(B, Hkv, G, D), kp, vp, ks, vs, jmask, used)
    else:
        span = jmask.shape[0] - kp.shape[1]
        o = shared_prefix_attention(q.reshape(B, Hkv, G, D), kp, vp, ks[:, :, :span], vs[:, :, :span], jmask)
    x = x + F.linear(o, w_o)
    h = F.rms_norm(x, (x.shape[-1],), n2, eps)
    g_, u_ = F.linear(h, w_gu).chunk(2, dim=-1)
    return x + F.linear(F.silu(g_) * u_, w_down)


def _draw_rows(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """One token per row (top_p = 1): where u[j] falls in row j's CDF of softmax(logits / T) (float64 sums)."""
    probs = torch.log_softmax(logits / temperature, dim=-1).exp()
    cdf = probs.double().cumsum(-1)
    x = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def compiled_draw():
    """The device loop's per-step draw (softmax, float64 CDF, search) as one compiled kernel chain: the same math
    as the engine's `_distribution` + CDF search, for top_p = 1."""
    return torch.compile(_draw_rows, dynamic=False)


class CudaGraphDecoder(SharedPrefixDecoder):
    """`SharedPrefixDecoder` with CUDA graphs, the prompt-forward graph and, with `compile`, the compiled layer and
    the Triton suffix kernel (see the module docstring). On CPU it behaves as its parent (tests run its static
    forms there)."""

    def __init__(self, model, options: DecodingOptions = DecodingOptions(), fuse: bool | None = None):
        super().__init__(model, fuse=fuse)
        cuda = self.lm.device.type == "cuda"
        self.options = options
        self.graphs = options.cuda_graphs and cuda
        self.compile = options.compile
        self.span_bucket = max(1, options.span_bucket)
        # graph shapes use the prompt length rounded up to this (the padding is masked), so one captured graph (and
        # one compiled layer) serves every prompt of that bucket instead of one per exact length
        self.prompt_bucket = max(1, options.prompt_bucket)
        self.pool_size = max(1, options.graph_pool)
        # the prompt forward as a CUDA graph too (fused weights only), per prompt bucket, for prompts up to this
        self.graph_prefill_max = options.graph_prefill_max
        self._pool: "dict[tuple, _Graph]" = {}
        self._prefill_pool: "dict[int, _PrefillGraph]" = {}
        compiled = self.graphs and self.fused is not None and self.compile
        self._layer = None  # the pure layer function for static steps, compiled (below) on CUDA
        # the Triton suffix kernel goes with the compiled layer (0.73 -> 0.651 s), used only if it runs here and
        # agrees with the plain math; without compile its log-sum-exp merge costs more than it saves (0.93 s)
        self.triton_suffix = compiled and self._check_triton()
        if compiled and self.lm.config.hidden_act == "silu" and self.lm.model.layers[0].self_attn.o_proj.bias is None:
            import torch._dynamo

            # one specialisation per (rows, prompt length, span bucket): allow plenty before falling back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self._layer = torch.compile(fused_layer, dynamic=False)

    def _check_triton(self) -> bool:
        """Use the Triton suffix kernel only if it runs here and agrees with the plain math."""
        try:
            dev, dt = self.lm.device, self.lm.dtype
            B, cap, used = 3, 40, 37
            g = torch.Generator(device=dev).manual_seed(0)
            q = torch.randn(B, self.n_kv, self.group, self.head_dim, device=dev, dtype=dt, generator=g)
            q = q * self.head_dim ** -0.5
            k = torch.randn(B, self.n_kv, cap, self.head_dim, device=dev, dtype=dt, generator=g)
            v = torch.randn(B, self.n_kv, cap, self.head_dim, device=dev, dtype=dt, generator=g)
            o1, l1 = _triton_suffix_op()(q.reshape(B, -1, self.head_dim), k, v,
                                         torch.full((1,), used, device=dev), self.group)
            o2, l2 = _attn_lse(q, k[:, :, :used], v[:, :, :used], None)
            o2 = o2.reshape(B, -1, self.head_dim)
            l2 = l2.reshape(B, -1)
            return bool(torch.allclose(o1.float(), o2.float(), atol=3e-2, rtol=3e-2)
                        and torch.allclose(l1.float(), l2.float(), atol=3e-2))
        except Exception as e:  # noqa: BLE001 - no Triton here: the plain math
            print(f"triton suffix attention unavailable: {type(e).__name__}: {str(e)[:300]}")
            return False

    # -------------------------------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, ids: list[int], past: "PromptKV | None" = None) -> Prefix:
        """With graphs and fused weights (no adapters) the prompt forward replays a CUDA graph captured per prompt
        bucket; the returned K/V are then views into that graph's buffers, valid until the next prefill of the same
        bucket (the engine decodes from a prefix before it prefills the next prompt)."""
        if past is None and self.whole_prompt(ids):
            return self._graph_prefill(ids)
        return super().prefill(ids, past)

    def whole_prompt(self, ids: list[int]) -> bool:
        """True where the prompt forward is one captured CUDA graph: splitting it off a cached prefix would not pay."""
        return self.graphs and self.fused is not None and 0 < len(ids) <= self.graph_prefill_max

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
            qk = rope_apply(qkv[:, : H + Hkv], cos, sin_s)
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
            n = len(self.lm.model.layers)
            pg.kv_all = torch.zeros((2, n, self.n_kv, Lb, self.head_dim), dtype=dt, device=dev)
            pg.kv = [(pg.kv_all[0, i], pg.kv_all[1, i]) for i in range(n)]
            pg.graph = pg.out = None
            self._prefill_pool[Lb] = pg
        else:
            self._prefill_pool[Lb] = self._prefill_pool.pop(Lb)
        pg.tokens.copy_(torch.tensor(list(ids) + [0] * (Lb - L)))
        pg.last.fill_(L - 1)
        return pg

    def _graph_prefill(self, ids: list[int]) -> Prefix:
        pg = self._prefill_buffers(ids)
        out = self._replay_prefill(pg)
        L = len(ids)
        return _PackedPrefix(length=L, logits=out.clone(), kv=[(k[:, :L], v[:, :L]) for k, v in pg.kv],
                             packed=pg.kv_all)

    def _replay_prefill(self, pg: "_PrefillGraph") -> torch.Tensor:
        """Replay the bucket's prompt-forward graph (captured on first use); returns its logits buffer."""
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
        return pg.out

    def start(self, prefix: Prefix, rows: int, capacity: int, graph: bool = True) -> State:
        """`graph=False`: never a CUDA graph for this batch (short or irregular work such as exact mode)."""
        if graph and self.graphs:  # `graphs` only on CUDA
            g = self._pooled(rows, capacity, prefix)
            return GraphState(prefix=g.prefix, rows=rows, capacity=capacity, ks=g.ks, vs=g.vs, graph=g)
        return super().start(prefix, rows, capacity)

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
            n, dt, dev = len(prefix.kv), k0.dtype, k0.device
            g = _Graph()
            # all layers' suffix keys in one tensor (layers, rows, Hkv, cap, D), their values in another (two, so
            # that the K and V a compiled layer writes never share storage), the prompt's K/V in a third (2, layers,
            # Hkv, bucket, D; zero padding: finite, and masked out): `select` and a prompt copy are then a few
            # kernels, not two per layer; the per-layer lists are views
            g.k_all = torch.zeros((n, *self._suffix_shape(rows, capacity)), dtype=dt, device=dev)
            g.v_all = torch.zeros_like(g.k_all)
            g.ks = [g.k_all[i] for i in range(n)]
            g.vs = [g.v_all[i] for i in range(n)]
            g.pkv = torch.zeros((2, n, self.n_kv, Lb, self.head_dim), dtype=dt, device=dev)
            g.prefix = _PackedPrefix(length=L, logits=prefix.logits, packed=g.pkv,
                                     kv=[(g.pkv[0, i], g.pkv[1, i]) for i in range(n)])
            g.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
            g.t = torch.zeros(1, dtype=torch.long, device=dev)
            g.plen = torch.zeros(1, dtype=torch.long, device=dev)
            g.pmask = torch.zeros(Lb, dtype=torch.bool, device=dev)
            g.graphs = {}
            self._pool[key] = g
        else:
            self._pool[key] = self._pool.pop(key)  # most recently used last
        if prefix is not g.prefix:
            src = getattr(prefix, "packed", None)
            if src is not None and src.shape[:3] == g.pkv.shape[:3] and src.shape[3] >= L and src.dtype == g.pkv.dtype:
                g.pkv[:, :, :, :L].copy_(src[:, :, :, :L])  # one kernel for all layers
            else:
                for (sk, sv), (k, v) in zip(g.prefix.kv, prefix.kv):
                    sk[:, :L].copy_(k[:, :L])
                    sv[:, :L].copy_(v[:, :L])
            g.prefix.length, g.prefix.logits = L, prefix.logits
        g.plen.fill_(L)
        g.pmask.copy_(torch.arange(Lb, device=k0.device) < L)
        return g

    def select(self, state: State, index: torch.Tensor) -> None:
        if _graph(state) is None:
            return super().select(state, index)
        index = index.to(state.ks[0].device)
        t = state.t
        rows = int(index.numel())
        g = self._pooled(rows, state.capacity, state.prefix)  # move into the pooled buffers of the new shape
        if t:
            _move_rows(state.graph.k_all, g.k_all, index, t)
            _move_rows(state.graph.v_all, g.v_all, index, t)
        state.ks, state.vs, state.prefix, state.graph = g.ks, g.vs, g.prefix, g
        state.rows = rows

    # ---------------------------------------------------------------------------------------- step
    def _static_prompt(self, state: State, t: torch.Tensor) -> tuple:
        g = _graph(state)
        if g is None:
            return super()._static_prompt(state, t)
        return t + g.plen, g.pmask  # pooled buffers: the prompt padded to a bucket, its length on the device

    def _layer_step(self, i: int, x: torch.Tensor, cos, sin_s, state: State, t, static: bool, jmask, span: int,
                    used) -> torch.Tensor:
        if static and self._layer is not None:  # the compiled pure layer
            return self._compiled_layer(i, x, cos, sin_s, state, t, jmask, used)
        return super()._layer_step(i, x, cos, sin_s, state, t, static, jmask, span, used)

    def _masks(self, static: bool, t, pmask, mask, L: int, device) -> tuple:
        if not self.triton_suffix:
            return super()._masks(static, t, pmask, mask, L, device)
        # the suffix by its length, not a mask: jmask is the prompt's only
        return pmask, (t + 1) if static else torch.full((1,), t + 1, device=device)

    def _attend(self, qg, kp, vp, ks, vs, jmask, span: int, used):
        if used is None:
            return super()._attend(qg, kp, vp, ks, vs, jmask, span, used)
        return _suffix_kernel_attention(qg, kp, vp, ks, vs, jmask, used)

    def _compiled_layer(self, i: int, x, cos, sin_s, state: State, t_idx, jmask, used):
        layer = self.lm.model.layers[i]
        w, b, gu = self.fused[i]
        kp, vp = state.prefix.kv[i]
        Hkv, G, D = self.n_kv, self.group, self.head_dim
        return self._layer(x, w, b, layer.self_attn.o_proj.weight, gu, layer.mlp.down_proj.weight,
                           layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                           layer.input_layernorm.variance_epsilon, cos, sin_s, kp, vp, state.ks[i], state.vs[i], t_idx,
                           jmask, Hkv * G, Hkv, G, D, self.scaling, used)

    def _step_logits(self, state: State, tokens: torch.Tensor, borrow: bool) -> torch.Tensor:
        if _graph(state) is not None:  # pooled buffers (`start` with graphs)
            return self._graph_step(state, tokens, borrow)
        return super()._step_logits(state, tokens, borrow)

    def _graph_step(self, state: State, tokens: torch.Tensor, borrow: bool = False) -> torch.Tensor:
        """Replay the captured step for this shape and span bucket (captured on first use, kept in the pool)."""
        g = state.graph
        g.tokens.copy_(tokens)
        g.t.fill_(state.t)
        b = max(1, self.span_bucket)
        # with the Triton suffix kernel the length lives on the device: one graph for all steps
        span = state.capacity if self.triton_suffix else min(state.capacity, -(-(state.t + 1) // b) * b)
        out = self._replay_step(state, span)
        return out if borrow else out.clone()

    def _replay_step(self, state: State, span: int) -> torch.Tensor:
        """Replay the step graph of this shape and span (captured on first use); returns its logits buffer."""
        g = state.graph
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
        return out


def _move_rows(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, t: int) -> None:
    """dst[:, r, :, :t] = src[:, index[r], :, :t] for (layers, rows, Hkv, cap, D) suffix buffers: one gather and one
    copy for all layers (in groups of layers where the gathered temporary would pass `_MOVE_CHUNK_BYTES`). `src`
    and `dst` may be the same buffer (the gather is materialised first)."""
    per_layer = index.numel() * src.shape[2] * t * src.shape[4] * src.element_size()
    step = max(1, int(_MOVE_CHUNK_BYTES // max(1, per_layer)))
    for a in range(0, src.shape[0], step):
        b = min(src.shape[0], a + step)
        dst[a:b, :, :, :t].copy_(src[a:b, :, :, :t].index_select(1, index))


class _Graph:
    """Static buffers of one decode shape and the CUDA graph of its step (captured on first use)."""

    tokens: torch.Tensor
    t: torch.Tensor
    graphs: dict  # span bucket -> (CUDAGraph, output tensor)
    prefix: Prefix  # K/V padded to the prompt bucket
    plen: torch.Tensor  # (1,) the prompt's real length
    pmask: torch.Tensor  # (bucket,) True for real prompt positions
    k_all: torch.Tensor  # (layers, rows, Hkv, cap, D): the suffix keys of every layer
    v_all: torch.Tensor  # the same for the values
    pkv: torch.Tensor  # (2, layers, Hkv, bucket, D): the padded prompt's K and V (`prefix.packed`)
    ks: list  # per layer views k_all[i]
    vs: list  # per layer views v_all[i]


class _PrefillGraph:
    """Static buffers of one prompt bucket's forward and its CUDA graph."""

    tokens: torch.Tensor  # (bucket,) prompt ids, zero-padded
    last: torch.Tensor  # (1,) index of the last real position
    kv_all: torch.Tensor  # (2, layers, Hkv, bucket, D)
    kv: list  # per layer views (kv_all[0, i], kv_all[1, i])
    graph: object
    out: torch.Tensor | None
