"""The embedded engine: transformers + peft, CPU or GPU.

Sampling (`chat`): the chat-templated prompt is prefilled ONCE; all `n` continuations are decoded from
that one prompt cache in chunks of at most `ModelSpec.max_batch_size` rows (fewer if the per-row KV
buffers would exceed the KV budget: `decoding.kv_budget_mb` of the model's config, default 1024 on CPU, 40 % of
free GPU memory on CUDA). Llama-family models use `SharedPrefixDecoder` (prompt K/V shared by all rows; on CUDA
its graph/compile subclass in `cuda_fastpath.py`), others the generic `HFDecoder` (see `decoding.py`). The
knobs are the model's `decoding` section (`DecodingOptions`). Per step: softmax(logits / T), optional nucleus
(top_p) filter, then inverse-CDF sampling with uniforms drawn up front from `torch.Generator(seed)` as an
(n, max_tokens) matrix: sample i at step t always uses u[i, t], so with the same (seed, max_tokens, model) sample
i is the same whatever n, the batch size, or stop strings. Rows that end (EOS or a stop string) are dropped
from the batch on CPU once a quarter of them are done (`_Group`). On CUDA, requests without logprobs, stop strings
or stop_at_answer (T > 0) take `_sample_chunk_device` instead: the same draws, made on the GPU with no host sync per
step, one row per sample, EOS applied at the end (checked every 16 steps for an early stop).

Many requests at once (CPU, shared-prefix decoder): decode there is bound by reading the weights, so the engine
thread decodes every pending request together (`_Batch`): each request is prefilled when it is taken up, its rows
join one `cpu_batch.TiledStep` per step beside the rows of all other pending requests (the same adapter), and
requests that arrive meanwhile join at the next step. The numbers of a request do not depend on its companions
(fixed row tiles, see `cpu_batch`): the same (seed, n) gives the same samples alone, batched, resumed. With
`dtype: bfloat16` on the CPU the body runs in bf16 (AMX matrix units: ~3x the fp32 speed on a Sapphire Rapids
core) and the LM head stays fp32 (`_head_w`), so logits and exact-mode probabilities keep fp32 resolution.

Prompt prefix cache: a prompt with a system turn is always computed in two pieces, the system turn (its K/V
kept in a per-adapter LRU, `decoding.prefix_cache_mb`, default 256, 0 = off) and the rest, so the 4 games
of a context, every sample block and every exact call of a scenario reuse one system-turn forward; hits and
misses give identical numbers (`prefix_cache.py`). Not on CUDA's whole-prompt graph path (no adapters), where
the prompt forward is one graph replay anyway.

Semantics (OpenAI-compatible): `stop` strings end a sample and are not included in its text
(finish_reason "stop"); EOS tokens (generation config + tokenizer + ChatML/Llama-3 end tokens present in
the vocabulary) end a sample (not in the text) unless `ignore_eos`; `max_tokens` ends it with
finish_reason "length". `logprobs` are log-probabilities under the distribution the token was drawn
from *before* top_p, i.e. log_softmax(logits / T) (T = 0: T = 1), with `top_logprobs` (<= 20) of the same.

Adapters: peft LoRA adapters are loaded into one multi-adapter `PeftModel`; a request names one
(`set_adapter`) or none (`disable_adapter()` context, the base model). All model work runs on one worker
thread per engine, so switching adapters between requests is safe; a batch holds requests of one adapter, exact
calls and adapter changes run between batches (a queued one stops new requests from joining a running batch).

Exact mode: see `services.teacher.exact`.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tomtransfer.services.common import lean_transformers
from tomtransfer.services.teacher.engines.base import (
    ChatRequest,
    ChatResult,
    Completion,
    Engine,
    EngineInputError,
    ExactRequest,
    ExactResult,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    end_token_ids,
)
from tomtransfer.services.teacher.engines.decoding import (
    DecodingOptions,
    HFDecoder,
    Prefix,
    SharedPrefixDecoder,
    State,
    fast_path_supported,
    prompt_kv,
)
from tomtransfer.services.teacher.engines import cpu_batch
from tomtransfer.services.teacher.engines.decoder_ops import causal_lm
from tomtransfer.services.teacher.engines.prefix_cache import PrefixCache
from tomtransfer.services.teacher.exact import UNDECIDED, RootClassifier, TokenTable, expand, make_rule

MIN_SPLIT = 16  # a shorter system turn is not worth a cache entry


def _libc():
    """glibc, for malloc_trim (None elsewhere: musl, macOS)."""
    try:
        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()

def make_decoder(model, prefer_fast: bool = True, options: DecodingOptions | None = None):
    """The shared-prefix decoder where the model supports it (on CUDA its graph/compile subclass), else HF's."""
    if prefer_fast:
        ok, _ = fast_path_supported(model)
        if ok:
            if causal_lm(model).device.type == "cuda":
                from tomtransfer.services.teacher.engines.cuda_fastpath import CudaGraphDecoder

                return CudaGraphDecoder(model, options or DecodingOptions())
            return SharedPrefixDecoder(model)
    return HFDecoder(model)


def _pick_device(want: str) -> torch.device:
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EngineInputError("device 'cuda' requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _pick_dtype(want: str, device: torch.device) -> torch.dtype:
    if want == "auto":
        # bf16 on this CPU is slower for prompts (MODELS.md); on GPU it is the natural choice.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[want]


class TransformersEngine(Engine):
    name = "transformers"
    supports_adapters = True

    def __init__(self, spec, *, model_path: str | None = None, threads: int | None = None, model=None,
                 tokenizer=None):
        """`spec`: a `ModelSpec` (its `decoding` section holds the knobs, see `DecodingOptions`)."""
        transformers = lean_transformers.load()

        from tomtransfer.services.common.models import resolve_model

        self.spec = spec
        self.device = _pick_device(spec.device)
        self.dtype = _pick_dtype(spec.dtype, self.device)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(int(threads))
        if model is None:
            path = model_path or str(resolve_model(spec.model))
            self.model_path = path
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        else:  # an in-memory model (benchmarks, tests)
            self.model_path = model_path or "<in-memory>"
            self.tokenizer = tokenizer
        self.base = model.to(self.device).eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.model = self.base
        self.peft = None
        self.adapters: dict[str, str] = {}
        self.vocab_size = int(self.base.get_output_embeddings().weight.shape[0])
        self.end_ids = self._end_ids()
        self.options = opts = DecodingOptions.of(spec)
        self.fast = opts.fast
        self.graphs = opts.cuda_graphs and self.device.type == "cuda"
        self.compile = opts.compile
        self.decoder = self._make_decoder()
        # the on-device sampling loop (`_sample_chunk_device`): default on CUDA; `decoding.device_loop` forces it
        self.device_loop = self.device.type == "cuda" if opts.device_loop is None else opts.device_loop
        self.max_batch_size = spec.max_batch_size
        # with `compile` on CUDA, the device loop's per-step draw as one compiled kernel chain (`cuda_fastpath`)
        self._draw_rows = None
        if self.device.type == "cuda" and self.compile:
            from tomtransfer.services.teacher.engines.cuda_fastpath import compiled_draw

            self._draw_rows = compiled_draw()
        self.max_context = int(getattr(self.base.config, "max_position_embeddings", 0) or 1 << 30)
        self._table: TokenTable | None = None
        self._root: RootClassifier | None = None
        self.prefixes = PrefixCache(float(opts.prefix_cache_mb) * 2**20)
        self._system_ids: dict[str, list[int]] = {}
        # CPU: requests are decoded together (`cpu_batch`); `_jobs` holds the chat requests not yet taken up,
        # `_others` counts other work (exact calls, adapter changes) waiting for the engine thread
        self._jobs: list[_Job] = []
        self._jobs_lock = threading.Lock()
        self._others = 0
        self._head_w: torch.Tensor | None = None
        if self.device.type == "cpu" and self.dtype != torch.float32:
            # a bf16 body with an fp32 LM head: the logits (sampling, exact mode) keep fp32 precision
            self._head_w = self.base.get_output_embeddings().weight.detach().float()
        self._tiled = self._make_tiled()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.name}")
        self._pool.submit(self._root_classifier)  # warm the vocabulary table off the request path

    # ----------------------------------------------------------------------------------- plumbing
    def _make_decoder(self):
        return make_decoder(self.model, prefer_fast=self.fast, options=self.options)

    def _make_tiled(self) -> "cpu_batch.TiledStep | None":
        """The batched CPU decode (`cpu_batch`) where it applies: the shared-prefix decoder on the CPU, sampling on
        the host (not the device loop)."""
        if self.device.type != "cpu" or type(self.decoder) is not SharedPrefixDecoder or self.device_loop:
            return None
        # rows per tile: a bf16 step (AMX) of Qwen2.5-0.5B on one core, 2 rows alone / 80 rows of 20 requests:
        # tile 16 233 / 943 ms, 32 257 / 800 ms, 64 357 / 767 ms; fp32 products cost twice as much at 64 rows as at 16
        tile = 32 if self.dtype == torch.bfloat16 else cpu_batch.TILE
        return cpu_batch.TiledStep(self.decoder, tile=tile, lm_head_weight=self._head_w)

    def _end_ids(self) -> set[int]:
        gen = getattr(self.base, "generation_config", None)
        return end_token_ids(self.tokenizer, getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id)

    def _root_classifier(self) -> RootClassifier:
        if self._root is None:
            self._table = TokenTable.from_tokenizer(self.tokenizer, self.vocab_size, self.end_ids)
            self._root = RootClassifier(self._table)
            self._root.classify(make_rule("choice"))
        return self._root

    async def _run(self, fn, *args):
        """`fn(*args)` on the engine thread (exact calls, adapters, the non-batched sampling path)."""
        loop = asyncio.get_running_loop()
        with self._jobs_lock:
            self._others += 1

        def call():
            with self._jobs_lock:
                self._others -= 1
            return fn(*args)

        return await loop.run_in_executor(self._pool, call)

    def prompt_ids(self, messages) -> list[int]:
        return self.prompt(messages)[0]

    def prompt(self, messages) -> tuple[list[int], int]:
        """The chat-templated prompt and where its system turn ends (0: no cacheable system turn)."""
        msgs = [dict(m) for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja errors on odd role orders etc.
            raise EngineInputError(f"the model's chat template rejected the messages: {e}", param="messages") from None
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise EngineInputError("empty prompt", param="messages")
        return ids, self._system_split(msgs, ids)

    def _system_split(self, msgs: list[dict], ids: list[int]) -> int:
        """The length of the system turn's tokens when they are a prefix of `ids` (templates that fold the system
        text into the first user turn, e.g. Llama-2's, give 0: nothing is split off then)."""
        if len(msgs) < 2 or msgs[0].get("role") != "system" or not isinstance(msgs[0].get("content"), str):
            return 0
        text = msgs[0]["content"]
        sys_ids = self._system_ids.get(text)
        if sys_ids is None:
            try:
                rendered = self.tokenizer.apply_chat_template([msgs[0]], tokenize=False, add_generation_prompt=False)
                sys_ids = list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
            except Exception:  # noqa: BLE001 - a template that needs a user turn: no split
                sys_ids = []
            if len(self._system_ids) > 256:
                self._system_ids.clear()
            self._system_ids[text] = sys_ids
        b = len(sys_ids)
        return b if MIN_SPLIT <= b < len(ids) and ids[:b] == sys_ids else 0

    def _prefill(self, ids: list[int], split: int, adapter: str | None) -> Prefix:
        """The prompt forward, in two pieces when it has a system turn: that turn's K/V (cached per adapter), then
        the rest. Always the same pieces, so results do not depend on cache hits (see `prefix_cache`)."""
        # CPU with a bf16 body: the body's forward, then the fp32 head on the last position (`cpu_batch.prefill`)
        cpu = self._head_w is not None and type(self.decoder) is SharedPrefixDecoder
        whole = getattr(self.decoder, "whole_prompt", None)
        if split <= 0 or self.prefixes.budget <= 0 or (whole is not None and whole(ids)):
            return cpu_batch.prefill(self.model, ids, None, self._head_w) if cpu else self.decoder.prefill(ids)
        head = ids[:split]
        past = self.prefixes.get(adapter, head)
        if past is None:
            past = cpu_batch.prompt_kv(self.model, head) if cpu else prompt_kv(self.model, head)
            self.prefixes.put(adapter, head, past)
        if cpu:
            return cpu_batch.prefill(self.model, ids, past, self._head_w)
        return self.decoder.prefill(ids, past=past)

    @contextmanager
    def _adapter(self, name: str | None):
        if name is not None and name not in self.adapters:
            raise EngineInputError(f"adapter {name!r} is not loaded", param="model", status=404,
                                   code="model_not_found")
        if self.peft is None:
            yield
            return
        if name is None:
            with self.peft.disable_adapter():
                yield
        else:
            self.peft.set_adapter(name)
            yield

    def _rows_per_chunk(self, capacity: int) -> int:
        cfg = self.base.config
        layers = cfg.num_hidden_layers
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_row = 2 * layers * kv_heads * head_dim * capacity * torch.tensor([], dtype=self.dtype).element_size()
        if isinstance(self.decoder, HFDecoder):
            per_row *= 2  # the prompt is copied into every row, and torch.cat doubles it transiently
        if self.options.kv_budget_mb is not None:
            budget = float(self.options.kv_budget_mb) * 2**20
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = 0.4 * free
        else:
            budget = 1024 * 2**20
        return max(1, min(self.max_batch_size, int(budget // max(per_row, 1))))

    # ------------------------------------------------------------------------------------ sampling
    def _token_logprob(self, tid: int, lp: float, top) -> TokenLogprob:
        texts = self._table.texts if self._table else None
        text = texts[tid] if texts else self.tokenizer.decode([tid])
        out = TokenLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))
        if top is not None:
            vals, ids = top
            for v, i in zip(vals, ids):
                t = texts[i] if texts else self.tokenizer.decode([i])
                out.top_logprobs.append(TopLogprob(token=t, logprob=float(v), bytes=list(t.encode("utf-8"))))
        return out

    @staticmethod
    def _inverse_cdf(probs: torch.Tensor, row_of: list[int], u: torch.Tensor) -> list[int]:
        """Sample j takes the token where its own uniform u[j] falls in the CDF of its row's distribution.
        Each sample's randomness is fixed by (seed, sample index, step), whatever the batch layout."""
        R, V = probs.shape
        u = u.to(probs.device)
        if len(row_of) == R and row_of == list(range(R)):
            out = []
            for b in range(0, R, 64):  # float64 CDFs, 64 rows at a time to bound memory
                cdf = probs[b:b + 64].double().cumsum(-1)
                x = u[b:b + 64] * cdf[:, -1]
                out.append(torch.searchsorted(cdf, x.unsqueeze(1), right=True).squeeze(1))
            return torch.cat(out).clamp_(max=V - 1).tolist()
        by_row: dict[int, list[int]] = {}
        for j, r in enumerate(row_of):
            by_row.setdefault(r, []).append(j)
        res = [0] * len(row_of)
        for r, members in by_row.items():
            cdf = probs[r].double().cumsum(0)
            x = u[members] * cdf[-1]
            for j, t in zip(members, torch.searchsorted(cdf, x, right=True).clamp_(max=V - 1).tolist()):
                res[j] = t
        return res

    def _distribution(self, logits: torch.Tensor, p: SamplingParams):
        """(probs for drawing or None for greedy, log-probs for reporting or None)."""
        if p.temperature <= 0:
            return None, (torch.log_softmax(logits, dim=-1) if p.logprobs else None)
        logp = torch.log_softmax(logits / p.temperature, dim=-1)
        if p.top_p >= 1.0:
            return logp.exp(), (logp if p.logprobs else None)
        sorted_lp, idx = torch.sort(logp, dim=-1, descending=True)
        sp = sorted_lp.exp()
        drop = (sp.cumsum(-1) - sp) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
        probs = torch.softmax(torch.full_like(logp, float("-inf")).scatter(-1, idx, sorted_lp), dim=-1)
        return probs, (logp if p.logprobs else None)

    def _device_loop_ok(self, p: SamplingParams) -> bool:
        return (self.device_loop and p.temperature > 0 and not p.logprobs and not p.stop_at_answer
                and not any(p.stop) and getattr(p, "guided_choice", None) is None)

    def _draw_device(self, logits: torch.Tensor, p: SamplingParams, u: torch.Tensor) -> torch.Tensor:
        """`_inverse_cdf` on the device without a host sync: logits (R, V) with R = 1 (all samples from the
        same distribution) or R = len(u); sample j takes the token where u[j] falls in its row's CDF."""
        if logits.shape[0] > 1 and p.top_p >= 1.0 and self._draw_rows is not None:
            return self._draw_rows(logits, u, p.temperature)
        probs, _ = self._distribution(logits, p)
        V = probs.shape[-1]
        cdf = probs.double().cumsum(-1)
        if probs.shape[0] == 1:
            x = (u * cdf[0, -1]).unsqueeze(0)  # (1, n)
            return torch.searchsorted(cdf, x, right=True).squeeze(0).clamp_(max=V - 1)
        x = (u * cdf[:, -1]).unsqueeze(1)  # (n, 1)
        return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=V - 1)

    def _sample_chunk_device(self, prefix: Prefix, n: int, p: SamplingParams, uniforms: torch.Tensor,
                             check_every: int = 16) -> list[Completion]:
        """The batched path without per-step host work (no logprobs, stop strings or stop_at_answer; T > 0):
        one row per sample for the whole call (a fixed shape: one CUDA graph, no dedup/select), tokens drawn on
        the device with the same inverse-CDF rule and uniforms u[i, t] as `_sample_chunk`, kept on the device
        until the end. EOS is applied afterwards (a sample ends at its first end token; its later tokens are
        computed and thrown away), and the loop stops early once every row has ended (checked every
        `check_every` steps: one host sync each)."""
        dec = self.decoder
        cap = p.max_tokens
        dev = prefix.logits.device
        u = uniforms.to(dev)
        out = torch.empty((n, cap), dtype=torch.long, device=dev)
        ends = None if p.ignore_eos or not self.end_ids else torch.tensor(sorted(self.end_ids), device=dev)
        ended = torch.zeros(n, dtype=torch.bool, device=dev) if ends is not None else None
        logits = prefix.logits.unsqueeze(0)
        state: State | None = None
        steps = cap
        borrow = isinstance(dec, SharedPrefixDecoder)  # the draw consumes the logits before the next step
        for step in range(cap):
            tok = self._draw_device(logits, p, u[:, step])
            out[:, step] = tok
            if ended is not None:
                ended |= torch.isin(tok, ends)
                if (step + 1) % check_every == 0 and step + 1 < cap and bool(ended.all()):
                    steps = step + 1
                    break
            if step == cap - 1:
                break
            if state is None:
                state = dec.start(prefix, n, cap, graph=self.graphs and cap >= 16)
            logits = dec.step(state, tok, borrow=True) if borrow else dec.step(state, tok)
        rows = out[:, :steps].tolist()
        tokens, generated, finish = [], [], []
        for r in rows:
            cut = next((i for i, t in enumerate(r) if t in self.end_ids), None) if ends is not None else None
            if cut is None:
                tokens.append(r)
                generated.append(len(r))
                finish.append("length")
            else:
                tokens.append(r[:cut])
                generated.append(cut + 1)
                finish.append("stop")
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [Completion(text=texts[s], finish_reason=finish[s], num_tokens=generated[s], logprobs=None)
                for s in range(n)]

    def _sample_chunk(self, prefix: Prefix, n: int, p: SamplingParams, uniforms: torch.Tensor) -> list[Completion]:
        """Decode `n` samples of one prompt alone (see `_Group`), each step through the decoder's own `step`."""
        if self._device_loop_ok(p):
            return self._sample_chunk_device(prefix, n, p, uniforms)
        static_batch = self.graphs and self.device.type == "cuda" and p.max_tokens >= 16  # CUDA graph pays off
        g = _Group(self, prefix, n, p, uniforms, static_batch=static_batch)
        feed = g.advance(prefix.logits.unsqueeze(0))
        while feed is not None:
            feed = g.advance(self.decoder.step(g.state, feed))
        return g.completions()

    def _chat_sync(self, req: ChatRequest) -> ChatResult:
        ids, split = self.prompt(req.messages)
        return self.sample_ids(ids, req.params, req.adapter, split=split)

    def _check_sampling(self, ids: list[int], p: SamplingParams) -> None:
        if p.logprobs and self._table is None:
            self._root_classifier()
        if len(ids) + p.max_tokens > self.max_context:
            raise EngineInputError(f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds the model's "
                                   f"context of {self.max_context} tokens", param="max_tokens")
        if p.guided_choice is not None:
            raise EngineInputError("guided_choice (choice-constrained decoding) needs the vllm engine; use "
                                   "stop_at_answer or exact mode with the transformers engine", param="guided_choice")

    @staticmethod
    def _uniforms(p: SamplingParams) -> torch.Tensor:
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        return torch.rand(p.n, p.max_tokens, generator=gen, dtype=torch.float64)  # sample i, step t

    def sample_ids(self, ids: list[int], p: SamplingParams, adapter: str | None = None, split: int = 0) -> ChatResult:
        """`chat` from token ids (already chat-templated; `split`: where the cacheable system turn ends).
        Synchronous: call on the engine thread or alone. On the CPU this is the batched path with one request
        (the same samples as when batched with others)."""
        if self._tiled is not None:
            job = _Job(ids=ids, split=split, params=p, adapter=adapter)
            self._run_jobs(adapter, [job], join=False)
            if job.error is not None:
                raise job.error
            return job.result
        self._check_sampling(ids, p)
        uniforms = self._uniforms(p)
        t0 = time.perf_counter()
        with self._adapter(adapter), torch.inference_mode():
            prefix = self._prefill(ids, split, adapter)
            t1 = time.perf_counter()
            per_chunk = self._rows_per_chunk(p.max_tokens)
            choices: list[Completion] = []
            left = p.n
            while left > 0:
                rows = min(per_chunk, left)
                done = p.n - left
                choices += self._sample_chunk(prefix, rows, p, uniforms[done:done + rows])
                left -= rows
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        return ChatResult(choices=choices, prompt_tokens=len(ids), completion_tokens=sum(c.num_tokens for c in choices),
                          timings={"prefill_s": t1 - t0, "decode_s": t2 - t1, "rows_per_chunk": per_chunk})

    async def chat(self, request: ChatRequest) -> ChatResult:
        if self._tiled is None:
            return await self._run(self._chat_sync, request)
        loop = asyncio.get_running_loop()
        job = _Job(messages=request.messages, params=request.params, adapter=request.adapter, loop=loop,
                   future=loop.create_future())
        with self._jobs_lock:
            self._jobs.append(job)
        self._pool.submit(self._drain)
        return await job.future

    # ------------------------------------------------------------------------------ batched (CPU)
    def _take(self, adapter, first: bool) -> list["_Job"]:
        """Queued chat jobs for `adapter` (the first job's adapter when `first`); later arrivals join a running
        batch only while no other work (exact calls, adapter changes) waits for the engine thread."""
        with self._jobs_lock:
            if not self._jobs:
                return []
            if first:
                adapter = self._jobs[0].adapter
            elif self._others:
                return []
            take = [j for j in self._jobs if j.adapter == adapter]
            self._jobs = [j for j in self._jobs if j.adapter != adapter]
            return take

    def _drain(self) -> None:
        """Engine thread: decode every queued chat job of one adapter together (a no-op when an earlier drain took
        them)."""
        jobs = self._take(None, first=True)
        if jobs:
            self._run_jobs(jobs[0].adapter, jobs)
            del jobs  # nothing of the batch left on this thread's frames
            self._collect_if_idle()

    def _kv_bytes(self, tokens: int) -> int:
        cfg = self.base.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * kv_heads * head_dim * tokens * torch.tensor([], dtype=self.dtype).element_size()

    def _kv_budget(self) -> float:
        if self.options.kv_budget_mb is not None:
            return float(self.options.kv_budget_mb) * 2**20
        return 1024 * 2**20

    def _run_jobs(self, adapter: str | None, jobs: list["_Job"], join: bool = True) -> None:
        """Decode `jobs` (one adapter) and, with `join`, the jobs for that adapter that arrive meanwhile (see
        `_Batch`). Every job gets its result or its error; nothing is raised."""
        batch = _Batch(self, adapter)
        try:
            with self._adapter(adapter), torch.inference_mode():
                batch.run(jobs, join)
        except Exception as e:  # noqa: BLE001 - e.g. an adapter that is not loaded: every job gets the error
            for job in batch.jobs + jobs:
                job.fail(e)

    def _collect_if_idle(self) -> None:
        """After a batch, when no chat job waits: collect its reference cycles now. The batch's KV and activation
        tensors sit in cycles that Python's collector visits only after enough new *objects*, not after a few large
        tensors; and glibc keeps what they freed in its arenas until asked. So an idle CPU replica held ~0.3 GiB
        (the demo's teacher, through both trainings: the run's memory peak). Costs milliseconds once per batch."""
        with self._jobs_lock:
            idle = not self._jobs
        if idle and self.device.type == "cpu":
            gc.collect()
            if _LIBC is not None:
                _LIBC.malloc_trim(0)

    # -------------------------------------------------------------------------------------- exact
    def _exact_sync(self, req: ExactRequest) -> ExactResult:
        ids, split = self.prompt(req.messages)
        return self.exact_ids(ids, req, split=split)

    def exact_ids(self, ids: list[int], req: ExactRequest, split: int = 0) -> ExactResult:
        """`exact` from token ids (already chat-templated; `req.messages` is ignored). Synchronous."""
        rule = make_rule(req.kind, req.endowment)
        root = self._root_classifier()
        if len(ids) + req.max_depth > self.max_context:
            raise EngineInputError(f"prompt ({len(ids)} tokens) exceeds the model's context", param="messages")
        with self._adapter(req.adapter), torch.inference_mode():
            prefix = self._prefill(ids, split, req.adapter)
            backend = _TreeBackend(self.decoder, prefix, req.max_depth, self.device,
                                   graphs=self.graphs and getattr(self.decoder, "graphs", False),
                                   step=self._exact_step())
            p, invalid, unresolved, passes, top = expand(
                rule, backend, self._table, root, self.tokenizer, req.temperature,
                min_mass=req.min_mass, max_depth=req.max_depth)
        valid = sum(p.values())
        return ExactResult(kind=rule.kind, temperature=req.temperature, p=p, valid_mass=valid, invalid_mass=invalid,
                           unresolved_mass=unresolved, forward_passes=passes, prompt_tokens=len(ids),
                           top_tokens=top)

    def _exact_step(self):
        """The expansion's decode step: the decoder's own, except beside a bf16 body on the CPU, where the tiled
        step brings the fp32 LM head (exact calls run alone: nothing to be invariant to)."""
        if self._tiled is not None and self._head_w is not None:
            return lambda state, tokens: self._tiled.step([state], [tokens])[0]
        return None

    async def exact(self, request: ExactRequest) -> ExactResult:
        return await self._run(self._exact_sync, request)

    # ----------------------------------------------------------------------------------- adapters
    def _load_adapter_sync(self, name: str, path: str) -> None:
        from peft import PeftModel

        p = Path(path)
        if not (p / "adapter_config.json").is_file():
            raise EngineInputError(f"{path} is not a peft adapter folder (no adapter_config.json)", param="path")
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(p), adapter_name=name, is_trainable=False)
                self.peft.eval()
            else:
                if name in self.peft.peft_config:
                    self.peft.delete_adapter(name)
                self.peft.load_adapter(str(p), adapter_name=name, is_trainable=False)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise EngineInputError(f"adapter {name!r} does not fit this model: {e}", param="path") from None
        for prm in self.peft.parameters():
            prm.requires_grad_(False)
        self.adapters[name] = str(p)
        self.prefixes.clear()  # the model changed (a new LoRA wrapper, or new weights under an old name)
        self.model = self.peft
        self.decoder = self._make_decoder()
        self._tiled = self._make_tiled()

    def _unload_adapter_sync(self, name: str) -> None:
        if name not in self.adapters:
            raise EngineInputError(f"adapter {name!r} is not loaded", param="name", status=404, code="model_not_found")
        del self.adapters[name]
        self.prefixes.clear()
        if not self.adapters:
            # last one: take the LoRA layers out again, so the base model runs exactly as before any adapter
            self.base = self.peft.unload()
            self.peft = None
            self.model = self.base
            self.decoder = self._make_decoder()
            self._tiled = self._make_tiled()
            return
        self.peft.delete_adapter(name)
        if name in (self.peft.active_adapters or []):
            self.peft.set_adapter(next(iter(self.adapters)))

    async def load_adapter(self, name: str, path: str) -> None:
        await self._run(self._load_adapter_sync, name, path)

    async def unload_adapter(self, name: str) -> None:
        await self._run(self._unload_adapter_sync, name)

    def models(self) -> list[str]:
        return sorted(self.adapters)

    def info(self) -> dict:
        return {"engine": self.name, "model_path": self.model_path, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "decoder": self.decoder.name,
                "adapters": self.models(), "max_context": self.max_context, "vocab_size": self.vocab_size,
                "prefix_cache": self.prefixes.stats()}

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _deliver(future, result, error) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


@dataclass(eq=False)
class _Job:
    """One chat request on the batched CPU path: its groups (chunks of rows) and where its answer goes."""

    params: SamplingParams
    messages: tuple | None = None
    ids: list[int] | None = None
    split: int = 0
    adapter: str | None = None
    loop: object = None
    future: object = None
    groups: list = field(default_factory=list)
    done_groups: int = 0
    error: BaseException | None = None
    result: ChatResult | None = None
    t0: float = 0.0
    prefill_s: float = 0.0
    per_chunk: int = 0
    batched_with: int = 0  # the most other groups decoded beside this job's in one step

    def _send(self) -> None:
        if self.future is not None:
            try:
                self.loop.call_soon_threadsafe(_deliver, self.future, self.result, self.error)
            except RuntimeError:  # the caller's event loop is gone
                pass

    def fail(self, e: BaseException) -> None:
        if self.error is None and self.result is None:
            self.error = e
            self._send()

    def group_done(self) -> None:
        self.done_groups += 1
        if self.done_groups < len(self.groups) or self.error is not None:
            return
        choices = [c for g in self.groups for c in g.completions()]
        t = time.perf_counter()
        self.result = ChatResult(
            choices=choices, prompt_tokens=len(self.ids), completion_tokens=sum(c.num_tokens for c in choices),
            timings={"prefill_s": self.prefill_s, "decode_s": t - self.t0 - self.prefill_s,
                     "rows_per_chunk": self.per_chunk, "batched_groups": self.batched_with + 1})
        self.groups = []  # their KV and buffers go now: the caller holds this job until its coroutine resumes
        self._send()


class _Batch:
    """The engine thread's decode loop on the CPU: groups of rows of many jobs advance in one `TiledStep` per step.

    A job (one chat request) is prefilled when it is admitted and cut into groups of at most `_rows_per_chunk` rows.
    Groups start while the rows (`max_batch_size`) and the KV they hold (the rows' suffix buffers + the groups'
    prompt K/V, within `decoding.kv_budget_mb`) fit beside the running ones; the others wait for room. Between two
    steps, newly queued jobs for the same adapter join (unless other work waits for the engine thread). A job's
    answer is sent as soon as its own groups are done; a job that fails (bad input, or a step that raised) gets
    the error while the others go on."""

    def __init__(self, eng: "TransformersEngine", adapter: str | None):
        self.eng, self.adapter = eng, adapter
        self.jobs: list[_Job] = []
        self.waiting: list[_Group] = []
        self.active: list[tuple[_Group, torch.Tensor]] = []
        self.budget = eng._kv_budget()

    def admit(self, jobs: list["_Job"]) -> None:
        eng = self.eng
        for job in jobs:
            self.jobs.append(job)
            try:
                job.t0 = time.perf_counter()
                if job.ids is None:
                    job.ids, job.split = eng.prompt(job.messages)
                p = job.params
                eng._check_sampling(job.ids, p)
                uniforms = eng._uniforms(p)
                prefix = eng._prefill(job.ids, job.split, self.adapter)
                job.prefill_s = time.perf_counter() - job.t0
                job.per_chunk = per_chunk = eng._rows_per_chunk(p.max_tokens)
                for start in range(0, p.n, per_chunk):
                    g = _Group(eng, prefix, min(per_chunk, p.n - start), p, uniforms[start:start + per_chunk])
                    g.job = job
                    job.groups.append(g)
                self.waiting += job.groups
            except Exception as e:  # noqa: BLE001 - this job fails, the batch goes on
                job.fail(e)

    def _kv(self, g: "_Group") -> int:
        return self.eng._kv_bytes(g.n * g.cap + g.prefix.length)

    def _fits(self, g: "_Group") -> bool:
        if not self.active:
            return True
        rows = sum(a.n for a, _ in self.active) + g.n
        used = sum(self._kv(a) for a, _ in self.active)
        return rows <= self.eng.max_batch_size and used + self._kv(g) <= self.budget

    def _start_waiting(self) -> None:
        while self.waiting and self._fits(self.waiting[0]):
            g = self.waiting.pop(0)
            if g.job.error is None:
                self._advance(g, g.prefix.logits.unsqueeze(0), self.active)

    def _advance(self, g: "_Group", logits: torch.Tensor, into: list) -> None:
        try:
            feed = g.advance(logits)
        except Exception as e:  # noqa: BLE001
            g.job.fail(e)
            return
        if feed is None:
            g.job.group_done()
        else:
            into.append((g, feed))

    def run(self, jobs: list["_Job"], join: bool) -> None:
        self.admit(jobs)
        self._start_waiting()
        while self.active:
            for g, _ in self.active:
                g.job.batched_with = max(g.job.batched_with, len(self.active) - 1)
            try:
                logits = self.eng._tiled.step([g.state for g, _ in self.active], [f for _, f in self.active])
            except Exception as e:  # noqa: BLE001 - a failed step fails every job in it
                for g, _ in self.active:
                    g.job.fail(e)
                logits = None
            still: list[tuple[_Group, torch.Tensor]] = []
            if logits is not None:
                for (g, _), lg in zip(self.active, logits):
                    if g.job.error is None:
                        self._advance(g, lg, still)
            self.active = still
            if join:
                self.admit(self.eng._take(self.adapter, first=False))
            self._start_waiting()


class _Group:
    """The samples of one prompt decoded together (a request, or a chunk of one): the sampling state machine.

    `advance(logits)` takes the next-token logits of this group's rows, draws a token for every live sample, applies
    EOS, `max_tokens`, stop strings and `stop_at_answer`, and returns the tokens to feed next (one per row), or None
    when every sample has ended. The rows hold one *distinct* token prefix each among the live samples (early on
    many samples share a prefix: "C", "**"...), so a step costs one row per distinct prefix, not per sample; once
    all prefixes differ this is plain batched decoding. Rows whose samples all ended stay (fed a dummy token)
    until a quarter are dead. Everything here depends on this group's own samples only, never on what it is
    decoded beside."""

    def __init__(self, eng: "TransformersEngine", prefix: Prefix, n: int, p: SamplingParams, uniforms: torch.Tensor,
                 static_batch: bool = False):
        if p.guided_choice is not None:
            raise EngineInputError("guided_choice (choice-constrained decoding) needs the vllm engine; use "
                                   "stop_at_answer or exact mode with the transformers engine", param="guided_choice")
        self.eng, self.prefix, self.n, self.p, self.u = eng, prefix, n, p, uniforms
        self.dec = eng.decoder
        self.cap = p.max_tokens
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.generated = [0] * n
        self.lps: list[list[TokenLogprob]] | None = [[] for _ in range(n)] if p.logprobs else None
        self.finish: list[str | None] = [None] * n
        self.cut: list[int | None] = [None] * n  # char index of a stop string in the final text
        self.stops = [s for s in p.stop if s]
        self.window = (2 * max(len(s) for s in self.stops) + 8) if self.stops else 0
        self.rule = make_rule(p.stop_at_answer, p.endowment) if p.stop_at_answer else None
        self.live = list(range(n))  # samples still decoding
        self.row_of = [0] * n  # sample -> batch row holding its prefix
        self.state: State | None = None
        self.step = 0
        self.static_batch = static_batch
        self.job: _Job | None = None

    def advance(self, logits: torch.Tensor) -> torch.Tensor | None:
        eng, p, step, live = self.eng, self.p, self.step, self.live
        tokens, generated, lps, finish = self.tokens, self.generated, self.lps, self.finish
        probs, logp = eng._distribution(logits, p)
        rows_live = [self.row_of[s] for s in live]
        if probs is None:
            greedy = logits.argmax(-1).tolist()
            draws = [greedy[r] for r in rows_live]
        else:
            draws = eng._inverse_cdf(probs, rows_live, self.u[live, step])
        if logp is not None:
            ri = torch.tensor(rows_live, device=logp.device)
            ti = torch.tensor(draws, device=logp.device)
            chosen = logp[ri, ti].tolist()
            if p.top_logprobs:
                tv, tix = torch.topk(logp, p.top_logprobs, dim=-1)
                tv, tix = tv.tolist(), tix.tolist()
        still: list[int] = []
        check: list[int] = []
        for j, s in enumerate(live):
            t = draws[j]
            generated[s] += 1
            if not p.ignore_eos and t in eng.end_ids:
                finish[s] = "stop"
                continue
            tokens[s].append(t)
            if lps is not None:
                r = rows_live[j]
                lps[s].append(eng._token_logprob(t, chosen[j], (tv[r], tix[r]) if p.top_logprobs else None))
            if generated[s] >= self.cap:
                finish[s] = "length"
            else:
                still.append(s)
            if self.stops or self.rule is not None:
                check.append(s)
        if check:
            done = set()
            tok = eng.tokenizer
            if self.stops:
                tails = tok.batch_decode([tokens[s][-self.window:] for s in check], skip_special_tokens=True)
                for s, tail in zip(check, tails):
                    if any(st in tail for st in self.stops):
                        full = tok.decode(tokens[s], skip_special_tokens=True)
                        hits = [full.find(st) for st in self.stops if st in full]
                        if hits:
                            self.cut[s] = min(hits)
                            finish[s] = "stop"
                            done.add(s)
            if self.rule is not None:
                todo = [s for s in check if s not in done]
                texts = tok.batch_decode([tokens[s] for s in todo], skip_special_tokens=True)
                for s, text in zip(todo, texts):
                    if self.rule.status(text) != UNDECIDED:
                        finish[s] = "stop"
                        done.add(s)
            if done:
                still = [s for s in still if s not in done]
        if not still or step == self.cap - 1:
            self.live = []
            return None
        # next batch: one row per distinct (parent row, token)
        row_of = self.row_of
        pair_row: dict[tuple[int, int], int] = {}
        parents: list[int] = []
        feed: list[int] = []
        for s in still:
            key = (row_of[s], tokens[s][-1])
            if key not in pair_row:
                pair_row[key] = len(parents)
                parents.append(key[0])
                feed.append(key[1])
            row_of[s] = pair_row[key]
        state = self.state
        n_rows = state.rows if state is not None else 1
        dev = eng.device
        if state is None:
            self.state = self.dec.start(self.prefix, len(parents), self.cap, graph=self.static_batch)
        elif parents == sorted(set(parents)) and (self.static_batch or len(parents) > 0.75 * n_rows):
            # every row has at most one child: keep dead rows in place (no copy), feed them a dummy token
            if len(parents) != n_rows:
                full_feed = [0] * n_rows
                for s in still:
                    full_feed[parents[row_of[s]]] = tokens[s][-1]
                for s in still:
                    row_of[s] = parents[row_of[s]]
                feed = full_feed
        else:
            self.dec.select(state, torch.tensor(parents, device=dev))
        self.live = still
        self.step += 1
        return torch.tensor(feed, device=dev)

    def completions(self) -> list[Completion]:
        texts = self.eng.tokenizer.batch_decode(self.tokens, skip_special_tokens=True)
        out = []
        for s in range(self.n):
            text = texts[s] if self.cut[s] is None else texts[s][: self.cut[s]]
            out.append(Completion(text=text, finish_reason=self.finish[s] or "length", num_tokens=self.generated[s],
                                  logprobs=self.lps[s] if self.lps is not None else None))
        return out


class _TreeBackend:
    """Adapts a decoder to `exact.TreeBackend` (frontier rows share the prompt cache).

    With `graphs` (CUDA, shared-prefix decoder) the frontier is padded to a power-of-two number of rows (at least
    8; padding rows repeat row 0 with token 0 and are dropped from the result), so each expansion step replays
    a CUDA graph from the decoder's pool (kept per (rows, depth, prompt-length bucket), reused across calls)
    instead of launching every kernel from Python."""

    def __init__(self, decoder, prefix: Prefix, capacity: int, device, graphs: bool = False, step=None):
        self.dec, self.prefix, self.capacity, self.device = decoder, prefix, capacity, device
        self.graphs = graphs
        self.step = step or decoder.step  # CPU: the engine's tiled step (its fp32 LM head beside a bf16 body)
        self.state: State | None = None

    def root_logits(self) -> torch.Tensor:
        return self.prefix.logits

    def advance(self, parent_rows: list[int], tokens: list[int]) -> torch.Tensor:
        k = len(tokens)
        rows = max(8, 1 << (k - 1).bit_length()) if self.graphs else k
        pad = rows - k
        if self.state is None:
            self.state = self.dec.start(self.prefix, rows, self.capacity, graph=self.graphs)
        else:
            self.dec.select(self.state, torch.tensor(list(parent_rows) + [0] * pad, device=self.device))
        logits = self.step(self.state, torch.tensor(list(tokens) + [0] * pad, device=self.device))
        return logits[:k] if pad else logits
