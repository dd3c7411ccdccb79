"""A remote OpenAI-compatible teacher (the paper used a hosted 70B model) behind the engine interface.

Config (`ModelSpec`): `engine: openai`, `base_url` (e.g. `https://api.example.com/v1`), `api_key_env` (the
*name* of the environment variable holding the key; never the key itself), `remote_model` (the model name
at the remote end; default: `model`). The key is read when the engine starts; a named but unset variable
is an error then, not at the first request.

chat: forwarded as is. Requests with `n` above `remote_max_n` (default 128, the OpenAI cap)
are split into concurrent requests; each sub-request gets `seed + i` so seeded requests stay reproducible.
`ignore_eos` is sent as an extra body field (vLLM understands it). `stop_at_answer` cannot stop a remote
decoder early: the text is cut client-side at the prefix that decided the answer.
Upstream 4xx about the request -> `EngineInputError` (HTTP 400 with the upstream message); upstream auth
failures, 5xx and connection errors -> `UpstreamError` (HTTP 502).

exact (approximate, `method: "top_logprobs"`): one request with `max_tokens=1, temperature=1, logprobs,
top_logprobs=20` gives the 20 most likely first tokens with their T=1 log-probabilities. At temperature T
their weights are p^(1/T); tokens beyond the top 20 hold r = 1 - sum(top p) at T=1 and at most
r * p_min^(1/T - 1) (T <= 1) of unnormalised mass at T, which is reported as unresolved. A top token
that does not decide the answer on its own ("C" might continue as "Cooperate") is counted with the rule
applied to its text as if the response ended there, or as unresolved when that gives nothing. So this is
a first-token approximation; local engines compute the exact tree.
"""

from __future__ import annotations

import asyncio
import math

from tomtransfer.services.teacher.engines.base import (
    ChatRequest,
    ChatResult,
    Completion,
    Engine,
    EngineInputError,
    ExactRequest,
    ExactResult,
    TokenLogprob,
    TopLogprob,
)
from tomtransfer.services.teacher.exact import UNDECIDED, make_rule
from tomtransfer.shared.errors import UserError


class UpstreamError(EngineInputError):
    """The remote endpoint failed (not the client's request): HTTP 502."""

    def __init__(self, message: str):
        super().__init__(message, status=502, code="upstream_error")


class OpenAIEngine(Engine):
    name = "openai"
    supports_adapters = False

    def __init__(self, spec, *, model_path: str | None = None, client=None, **_ignored):
        import openai

        if not spec.base_url:
            raise UserError("engine 'openai' needs base_url")
        from tomtransfer.services.common.checks import secret

        key = secret(spec.api_key_env, "engine 'openai' api_key_env")
        self.spec = spec
        self.remote_model = spec.remote_model or spec.model
        self.max_n = spec.remote_max_n
        self.client = client or openai.AsyncOpenAI(base_url=spec.base_url, api_key=key or "EMPTY", max_retries=2,
                                                   timeout=spec.remote_timeout_s)

    async def _create(self, **kwargs):
        import openai

        try:
            return await self.client.chat.completions.create(**kwargs)
        except openai.AuthenticationError as e:
            raise UpstreamError(f"upstream rejected our credentials: {e.message}") from None
        except openai.PermissionDeniedError as e:
            raise UpstreamError(f"upstream denied access: {e.message}") from None
        except openai.NotFoundError as e:
            raise UpstreamError(f"upstream does not serve model {self.remote_model!r}: {e.message}") from None
        except openai.BadRequestError as e:
            raise EngineInputError(f"upstream rejected the request: {e.message}") from None
        except openai.UnprocessableEntityError as e:
            raise EngineInputError(f"upstream rejected the request: {e.message}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise UpstreamError(f"cannot reach upstream {self.spec.base_url}: {e}") from None
        except openai.APIStatusError as e:
            raise UpstreamError(f"upstream error {e.status_code}: {e.message}") from None

    async def chat(self, request: ChatRequest) -> ChatResult:
        p = request.params
        if request.adapter:
            raise EngineInputError("engine 'openai' does not serve adapters", param="model", status=404,
                                   code="model_not_found")
        sizes = [min(self.max_n, p.n - i) for i in range(0, p.n, self.max_n)]
        rule = make_rule(p.stop_at_answer, p.endowment) if p.stop_at_answer else None

        async def one(i: int, n: int):
            kwargs = dict(model=self.remote_model, messages=list(request.messages), n=n, temperature=p.temperature,
                          top_p=p.top_p, max_tokens=p.max_tokens)
            if p.seed is not None:
                kwargs["seed"] = p.seed + i
            if p.stop:
                kwargs["stop"] = list(p.stop)
            if p.logprobs:
                kwargs["logprobs"] = True
                if p.top_logprobs:
                    kwargs["top_logprobs"] = p.top_logprobs
            extra: dict = {}
            if p.ignore_eos:
                extra["ignore_eos"] = True
            if p.guided_choice is not None:  # a vLLM (or compatible) remote constrains decoding itself
                extra["structured_outputs"] = {"choice": list(p.guided_choice)}
            if extra:
                kwargs["extra_body"] = extra
            return await self._create(**kwargs)

        responses = await asyncio.gather(*(one(i, n) for i, n in enumerate(sizes)))
        choices: list[Completion] = []
        prompt_tokens = completion_tokens = 0
        for r in responses:
            if r.usage:
                prompt_tokens = r.usage.prompt_tokens
                completion_tokens += r.usage.completion_tokens
            for c in r.choices:
                text = c.message.content or ""
                finish = "length" if c.finish_reason == "length" else "stop"
                if rule is not None:
                    text, decided = _cut_at_answer(rule, text)
                    finish = "stop" if decided else finish
                lps = None
                if c.logprobs is not None and c.logprobs.content is not None:
                    lps = [TokenLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes,
                                        top_logprobs=[TopLogprob(x.token, x.logprob, x.bytes) for x in t.top_logprobs or []])
                           for t in c.logprobs.content]
                n_tok = len(lps) if lps is not None else 0
                choices.append(Completion(text=text, finish_reason=finish, num_tokens=n_tok, logprobs=lps))
        return ChatResult(choices=choices, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    async def exact(self, request: ExactRequest) -> ExactResult:
        if request.adapter:
            raise EngineInputError("engine 'openai' does not serve adapters", param="model", status=404,
                                   code="model_not_found")
        rule = make_rule(request.kind, request.endowment)
        r = await self._create(model=self.remote_model, messages=list(request.messages), n=1, temperature=1.0,
                               top_p=1.0, max_tokens=1, logprobs=True, top_logprobs=20)
        content = r.choices[0].logprobs.content if r.choices and r.choices[0].logprobs else None
        if not content:
            raise UpstreamError("upstream returned no logprobs (does it support logprobs/top_logprobs?)")
        top = content[0].top_logprobs or [content[0]]
        T = request.temperature
        pairs = [(t.token, math.exp(t.logprob)) for t in top]
        if T <= 0:
            best = max(pairs, key=lambda x: x[1])
            pairs, tail = [(best[0], 1.0)], 0.0
        else:
            rest = max(0.0, 1.0 - sum(q for _, q in pairs))
            p_min = min(q for _, q in pairs)
            pairs = [(tok, q ** (1.0 / T)) for tok, q in pairs]
            tail = rest * p_min ** (1.0 / T - 1.0) if T <= 1 else rest ** (1.0 / T)
        Z = sum(w for _, w in pairs) + tail
        p = {a: 0.0 for a in rule.answers()}
        invalid, unresolved = 0.0, tail / Z
        top_tokens = []
        for tok, w in pairs:
            s = rule.status(tok)
            if s is UNDECIDED:
                s = rule.final(tok)
                if s is None:
                    unresolved += w / Z
                    top_tokens.append({"token": tok, "p": w / Z, "decides": "undecided"})
                    continue
            if s is None:
                invalid += w / Z
            else:
                p[s] += w / Z
            top_tokens.append({"token": tok, "p": w / Z, "decides": s})
        usage = r.usage.prompt_tokens if r.usage else 0
        return ExactResult(kind=rule.kind, temperature=T, p=p, valid_mass=sum(p.values()), invalid_mass=invalid,
                           unresolved_mass=unresolved, forward_passes=1, prompt_tokens=usage, method="top_logprobs",
                           approximate=True, top_tokens=top_tokens[:10])

    def info(self) -> dict:
        return {"engine": self.name, "base_url": self.spec.base_url, "remote_model": self.remote_model,
                "adapters": []}

    async def close(self) -> None:
        await self.client.close()


def _cut_at_answer(rule, text: str) -> tuple[str, bool]:
    """The shortest prefix of `text` whose leading answer is decided (whole text if none)."""
    for i in range(1, len(text) + 1):
        if rule.status(text[:i]) is not UNDECIDED:
            return text[:i], True
    return text, False
