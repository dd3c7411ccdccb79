"""The sampling runner: fans requests out to the OpenAI-compatible serving app and stores every sample once.

One piece of code serves `tomtransfer generate` (teacher samples with motivations) and both estimators of
`tomtransfer evaluate` (sampled: `sample_async`; exact: `exact_async`), each called with its store already open
for writing (`with store.writer():`).

How a run goes:

1. The store (`services.collector.store.SampleStore`) says which sample indices of each (role, scenario)
   already exist; `plan_requests` turns the missing ones into requests over fixed blocks (block b =
   indices [b*k, (b+1)*k), `n` = the block's length, `seed` = the seed of its first index). A fresh run and
   a resumed one send the same (seed, n) for every block, so a server that is deterministic in (seed, n)
   makes a resumed run's rows identical to an uninterrupted run's.
2. Requests run concurrently (`asyncio.Semaphore(concurrency)`) through `openai.AsyncOpenAI` with the
   client's own retries off; each answered block is parsed (`shared.parsing`) and written as one shard,
   atomically, before it counts as done. Nothing is buffered in memory: a kill -9 loses at most the blocks
   in flight.
3. Faults, handled here, explicitly:
   - 5xx, 408/409/429, timeouts and connection errors are retried with exponential backoff and jitter;
   - a request that keeps failing for `RetryPolicy.give_up_after_s` (default 25 s) means the endpoint is
     dead or broken: every other request is cancelled and `EndpointError` is raised with one line (what
     failed, the last error, how many samples are kept, "rerun to resume"); with the defaults that is
     within ~35 s of the endpoint dying (give-up window + one backoff + one connect timeout);
   - an endpoint that hangs (accepts connections, never answers) would otherwise only be noticed after
     `request_timeout_s` (a healthy CPU server may legitimately need minutes per block): when no HTTP
     response of any kind has arrived for `stall_after_s` (20 s), a watchdog probes `GET /v1/models`;
     probes failing for `give_up_after_s` mean dead (~50 s in all). A slow endpoint answers its probes and
     is left alone;
   - any other 4xx (bad model / adapter name, n or max_tokens over the server's cap, auth) is raised at once
     as `EndpointError` with the server's message: retrying cannot fix it.
   Completed blocks are on disk whatever happens; rerunning the same command fills in only what is missing.
4. At the end the counts are checked: exactly N rows per (role, scenario), or an error.

Token counts: `prompt_tokens` is the request's; `completion_tokens` per sample is filled when the server
reports a per-choice count (a `completion_tokens` field on each choice, an extension) or when n == 1, and
left null otherwise rather than guessed from the request total.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tomtransfer.shared.errors import UserError
from tomtransfer.shared.games import PublicGoodsGame
from tomtransfer.shared.parsing import parse_choice, parse_contribution
from tomtransfer.shared.scenarios import Scenario

from tomtransfer.services.collector.store import ExactStore, Request, SampleStore, plan_requests
from tomtransfer.services.common.console import say


def api_root(base_url: str) -> str:
    """`http://host:port` from a base URL given with or without a trailing `/v1`."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class EndpointError(UserError):
    """The endpoint failed in a way retrying cannot fix (dead, rejecting requests, breaking the protocol).
    The message is one line; samples written before the failure are kept."""


@dataclass(frozen=True)
class Job:
    """N samples of one scenario from one role."""

    role: str
    model: str
    scenario: Scenario
    messages: list[dict[str, str]]
    n: int
    max_tokens: int | None = None  # this job's cap when it differs from the run's (e.g. a motivated role)

    @property
    def key(self) -> tuple[str, str]:
        return (self.role, self.scenario.id)

    @property
    def label(self) -> str:
        return f"{self.role}/{self.scenario.id}"


@dataclass(frozen=True)
class RequestSettings:
    """What every request of a run asks for (the engines' own per-call `SamplingParams` live in the engines)."""
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    block_size: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetryPolicy:
    """Retry and dead-endpoint rules. With the defaults a dead endpoint is reported within ~35 s when it
    refuses or drops connections, and within ~50 s when it hangs (stall 20 s + probes failing 25 s + one
    probe timeout); both stay under a minute whatever the concurrency."""

    backoff_base_s: float = 0.5
    backoff_max_s: float = 5.0
    give_up_after_s: float = 25.0  # one request (or the health probe) failing this long = endpoint dead
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 900.0  # a healthy CPU server may take minutes for one block
    stall_after_s: float = 20.0  # no HTTP response of any kind for this long -> start probing GET /v1/models
    probe_every_s: float = 2.5
    probe_timeout_s: float = 5.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random, capped."""
        d = min(self.backoff_max_s, self.backoff_base_s * (2 ** attempt))
        return d / 2 + random.uniform(0, d / 2)


@dataclass
class RunReport:
    requests: int = 0  # requests sent that succeeded
    retries: int = 0
    written: int = 0  # rows written by this run
    already: int = 0  # rows present before this run
    elapsed_s: float = 0.0
    counts: dict[tuple[str, str], int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ parsing
def parse_answer(scenario: Scenario, text: str | None) -> str | None:
    if isinstance(scenario.game, PublicGoodsGame):
        v = parse_contribution(text, scenario.game.endowment)
        return None if v is None else f"{v:g}"  # 7.0 -> "7", 7.5 -> "7.5": the amount as a person writes it
    return parse_choice(text)


def sample_rows(job: Job, req: Request, run_id: str, completion: Any, latency_s: float) -> list[dict]:
    choices = sorted(completion.choices, key=lambda c: c.index)
    if len(choices) != req.n or [c.index for c in choices] != list(range(req.n)):
        raise EndpointError(
            f"{job.label}: the endpoint returned {len(choices)} choices for n={req.n} "
            f"(indices {[c.index for c in choices][:8]}); it does not honour `n`"
        )
    usage = getattr(completion, "usage", None)
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    total_completion = getattr(usage, "completion_tokens", None)
    messages = json.dumps(job.messages, ensure_ascii=False)
    rows = []
    for c in choices:
        text = (c.message.content if c.message is not None else None) or ""
        answer = parse_answer(job.scenario, text)
        # Per-choice token counts when the server reports them (an extension field), else the request total
        # when n == 1; otherwise unknown rather than made up.
        extra = getattr(c, "model_extra", None) or {}
        ctoks = extra.get("completion_tokens")
        if ctoks is None and req.n == 1:
            ctoks = total_completion
        rows.append({
            "run_id": run_id,
            "role": job.role,
            "model": job.model,
            "scenario_id": job.scenario.id,
            "family": job.scenario.family,
            "context": job.scenario.context.id,
            "game": job.scenario.game_id,
            "sample_index": req.start + c.index,
            "seed": req.seed,
            "messages": messages,
            "response": text,
            "answer": answer,
            "valid": answer is not None,
            "latency_s": float(latency_s),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": ctoks,
            "finish_reason": c.finish_reason,
            "request_n": req.n,
            "choice_index": c.index,
        })
    return rows


# ------------------------------------------------------------------------------------------ faults
_RETRY_STATUS = {408, 409, 429}


def _classify(err: BaseException) -> str:
    """'retry', 'fatal' or 'raise' (not an endpoint error at all)."""
    import openai

    if isinstance(err, openai.APIStatusError):
        code = err.status_code
        return "retry" if code >= 500 or code in _RETRY_STATUS else "fatal"
    if isinstance(err, (openai.APIConnectionError, asyncio.TimeoutError)):  # includes APITimeoutError
        return "retry"
    if isinstance(err, openai.APIResponseValidationError):
        return "fatal"
    return "raise"


def _describe(err: BaseException) -> str:
    import openai

    if isinstance(err, openai.APIStatusError):
        msg = None
        body = err.body
        if isinstance(body, dict):
            e = body.get("error", body)
            msg = e.get("message") if isinstance(e, dict) else (e if isinstance(e, str) else None)
            msg = msg or body.get("detail") or body.get("message")
        msg = msg or (err.response.text[:200] if err.response is not None else str(err))
        return f"HTTP {err.status_code}: {' '.join(str(msg).split())}"
    if isinstance(err, openai.APITimeoutError):
        return "request timed out"
    if isinstance(err, openai.APIConnectionError):
        cause = err.__cause__ or err.__context__
        return f"connection failed ({type(cause).__name__ if cause else 'error'}: {' '.join(str(cause or err).split())[:160]})"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


class _Aborted(Exception):
    pass


@dataclass
class _Shared:
    base_url: str
    store_root: str
    retry: RetryPolicy
    report: RunReport
    kept: Callable[[], int]
    fatal: EndpointError | None = None
    last_activity: float = field(default_factory=time.monotonic)  # last HTTP response of any kind

    def fail(self, what: str, err: BaseException, dead: bool) -> EndpointError:
        why = f"no answer for {self.retry.give_up_after_s:g} s, last error {_describe(err)}" if dead else _describe(err)
        if dead:
            e = EndpointError(f"endpoint {self.base_url} is down ({what}: {why}); {self.kept()} rows kept in "
                              f"{self.store_root}, rerun the same command to resume once it is back")
        else:
            e = EndpointError(f"endpoint {self.base_url} rejected the request ({what}: {why}); retrying cannot fix "
                              f"this; {self.kept()} rows kept in {self.store_root}")
        if self.fatal is None:
            self.fatal = e
        return e


async def _with_retries(shared: _Shared, what: str, call: Callable[[], Any]) -> tuple[Any, float]:
    """Run `call()` (an awaitable factory) until it succeeds; returns (result, latency of the successful try)."""
    first_failure: float | None = None
    attempt = 0
    while True:
        if shared.fatal is not None:
            raise _Aborted
        t0 = time.monotonic()
        try:
            result = await call()
            shared.last_activity = time.monotonic()
            return result, shared.last_activity - t0
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below
            import openai

            if isinstance(err, openai.APIStatusError):
                shared.last_activity = time.monotonic()  # it answered: alive, if unhappy
            kind = _classify(err)
            if kind == "raise":
                raise
            if kind == "fatal":
                raise shared.fail(what, err, dead=False) from None
            now = time.monotonic()
            first_failure = first_failure if first_failure is not None else t0
            if now - first_failure >= shared.retry.give_up_after_s:
                raise shared.fail(what, err, dead=True) from None
            shared.report.retries += 1
            await asyncio.sleep(shared.retry.delay(attempt))
            attempt += 1


# ----------------------------------------------------------------------------------------- progress
class _Progress:
    """On a terminal, a rich progress display: one overall bar, plus one bar per (role, scenario) while it is in
    flight (shown when its first request starts, removed when complete, so the display stays as small as the
    concurrency). Elsewhere (a log file, CI, a RayJob's log) with `lines`, one plain line every `every_s`
    seconds and at the end: done/total, rate, ETA. Otherwise silent."""

    def __init__(self, enabled: bool, total: int, done: int, description: str, lines: bool = False,
                 every_s: float = 15.0):
        self.enabled = enabled
        self.bars: dict[tuple[str, str], Any] = {}
        self.done: dict[tuple[str, str], int] = {}
        self._initial: dict[tuple[str, str], int] = {}
        self.lines = lines and not enabled
        self.total, self.start_done, self.description, self.every_s = total, done, description, every_s
        self.t0 = self.last = time.monotonic()
        if self.lines:
            self._line(done)
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=Console(stderr=True), transient=False,
        )
        self.overall = self.progress.add_task(f"[bold]{description}", total=total, completed=done)

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def add(self, job: Job, done: int) -> None:
        self.done[job.key] = done
        self._initial[job.key] = done

    def start(self, job: Job) -> None:
        if self.enabled and job.key not in self.bars and self.done.get(job.key, 0) < job.n:
            self.bars[job.key] = self.progress.add_task(f"  {job.label}", total=job.n, completed=self.done[job.key])

    def _line(self, done: int) -> None:
        elapsed = time.monotonic() - self.t0
        new = done - self.start_done
        rate = new / elapsed if elapsed > 0 and new else 0.0
        eta = f"{(self.total - done) / rate:.0f} s" if rate else "-"
        pct = 100 * done / self.total if self.total else 100.0
        say(f"[progress] {self.description}: {done}/{self.total} ({pct:.0f} %), {rate:.2f}/s, "
            f"elapsed {elapsed:.0f} s, ETA {eta}")
        self.last = time.monotonic()

    def advance(self, job: Job, k: int) -> None:
        self.done[job.key] = self.done.get(job.key, 0) + k
        if self.lines:
            done = self.start_done + sum(self.done.values()) - sum(self._initial.values())
            if done >= self.total or time.monotonic() - self.last >= self.every_s:
                self._line(done)
        if not self.enabled:
            return
        self.progress.advance(self.overall, k)
        bar = self.bars.get(job.key)
        if bar is not None:
            self.progress.advance(bar, k)
            if self.done[job.key] >= job.n:
                self.progress.remove_task(bar)
                del self.bars[job.key]


def _progress_enabled(progress: bool | str | None) -> bool:
    """A rich display? `progress`: True/False, None = on a terminal, "lines" = plain lines only (several runs at
    once: rich allows one live display per process)."""
    if progress == "lines":
        return False
    if progress is not None:
        return bool(progress)
    import sys

    return sys.stderr.isatty()


def _client(base_url: str, api_key: str | None, retry: RetryPolicy, concurrency: int):
    import httpx2
    import openai

    limits = httpx2.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return openai.AsyncOpenAI(
        base_url=api_root(base_url) + "/v1",
        api_key=api_key or "unused",
        max_retries=0,  # retries are ours (see _with_retries), so they are visible and bounded
        timeout=openai.Timeout(retry.request_timeout_s, connect=retry.connect_timeout_s),
        http_client=openai.DefaultAsyncHttpxClient(limits=limits),
    )


async def _watchdog(client, shared: _Shared) -> None:
    """Catch an endpoint that hangs instead of failing: requests in flight would only time out after
    `request_timeout_s`. When no HTTP response at all has arrived for `stall_after_s`, probe `GET /v1/models`
    (cheap, answered by any OpenAI-compatible server even while it is busy generating); probes failing for
    `give_up_after_s` mean the endpoint is dead. Returns never; raises EndpointError."""
    r = shared.retry
    failing_since: float | None = None
    while True:
        await asyncio.sleep(r.probe_every_s)
        if time.monotonic() - shared.last_activity < r.stall_after_s:
            failing_since = None
            continue
        t0 = time.monotonic()
        try:
            await client.models.list(timeout=r.probe_timeout_s)
            failing_since = None
            shared.last_activity = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001
            import openai

            if isinstance(err, openai.APIStatusError) and err.status_code < 500:
                failing_since = None  # it answers (e.g. 401/404 on the probe route): alive
                continue
            failing_since = failing_since if failing_since is not None else t0
            if time.monotonic() - failing_since >= r.give_up_after_s:
                raise shared.fail("health probe GET /v1/models while requests hang", err, dead=True) from None


async def _gather_or_abort(tasks: list[asyncio.Task], shared: _Shared, client=None) -> None:
    """Wait for all tasks (and watch the endpoint); on the first failure cancel the rest, wait for them to
    finish cancelling, and raise that failure."""
    if not tasks:
        return
    watchdog = asyncio.create_task(_watchdog(client, shared)) if client is not None else None
    pending = set(tasks)
    try:
        while pending:
            done, _ = await asyncio.wait(pending | ({watchdog} if watchdog else set()),
                                         return_when=asyncio.FIRST_COMPLETED)
            pending -= done
            if any(not t.cancelled() and t.exception() is not None for t in done):
                break
    finally:
        rest = [*pending, *([watchdog] if watchdog else [])]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
    # Retrieve every task's exception (so none is logged later from a garbage-collector callback), then raise
    # the endpoint failure if there was one, else the first unexpected error.
    errors = [t.exception() for t in tasks if t.done() and not t.cancelled()]
    if shared.fatal is not None:
        raise shared.fatal
    for e in errors:
        if e is not None and not isinstance(e, _Aborted):
            raise e


# ----------------------------------------------------------------------------------------- sampling
async def sample_async(
    store: SampleStore,
    jobs: list[Job],
    *,
    base_url: str,
    params: RequestSettings,
    run_id: str,
    concurrency: int = 16,
    api_key: str | None = None,
    retry: RetryPolicy = RetryPolicy(),
    progress: bool | str | None = None,
    description: str = "sampling",
) -> RunReport:
    """Fill `store` (already opened for writing) up to exactly `job.n` rows per job. See the module docstring."""
    t_start = time.monotonic()
    seen: set[tuple[str, str]] = set()
    for j in jobs:
        if j.key in seen:
            raise ValueError(f"two jobs for {j.label}")
        seen.add(j.key)
    have = store.indices()
    report = RunReport()
    plans: list[tuple[Job, Request]] = []
    for j in jobs:
        idx = have.get(j.key, set())
        extra = [i for i in idx if i >= j.n]
        if extra:
            raise EndpointError(f"{store.root}: {j.label} already holds {len(idx)} samples (index up to {max(idx)}) "
                                f"but N = {j.n}; use the same sample count or another output folder")
        report.already += len(idx)
        plans += [(j, r) for r in plan_requests(idx, j.n, params.block_size, base_seed=params.seed,
                                                 role=j.role, scenario_id=j.scenario.id)]
    total = sum(j.n for j in jobs)
    shared = _Shared(base_url=base_url, store_root=str(store.root), retry=retry, report=report,
                     kept=lambda: report.already + report.written)
    sem = asyncio.Semaphore(concurrency)
    client = _client(base_url, api_key, retry, concurrency)

    async def one(job: Job, req: Request, bar: _Progress) -> None:
        async with sem:
            if shared.fatal is not None:
                raise _Aborted
            kwargs: dict[str, Any] = dict(
                model=job.model, messages=job.messages, n=req.n, temperature=params.temperature,
                top_p=params.top_p, max_tokens=job.max_tokens or params.max_tokens, seed=req.seed,
            )
            if params.stop:
                kwargs["stop"] = list(params.stop)
            what = f"{job.label} samples {req.start}..{req.start + req.n - 1}"
            bar.start(job)
            completion, latency = await _with_retries(
                shared, what, lambda: client.chat.completions.create(**kwargs))
            rows = sample_rows(job, req, run_id, completion, latency)
            store.write(rows)  # the block is done once this returns (atomic, fsync'ed)
            report.requests += 1
            report.written += len(rows)
            bar.advance(job, len(rows))

    try:
        with _Progress(_progress_enabled(progress), total, report.already, description,
                       lines=progress in (None, "lines")) as bar:
            for j in jobs:
                bar.add(j, len(have.get(j.key, ())))
            tasks = [asyncio.create_task(one(j, r, bar)) for j, r in plans]
            await _gather_or_abort(tasks, shared, client)
    finally:
        await client.close()

    counts = store.counts()
    report.counts = {j.key: counts.get(j.key, 0) for j in jobs}
    wrong = {j.key: report.counts[j.key] for j in jobs if report.counts[j.key] != j.n}
    if wrong:
        k, c = next(iter(wrong.items()))
        raise EndpointError(f"{store.root}: {len(wrong)} (role, scenario) pairs do not hold exactly N samples "
                            f"after the run, e.g. {k[0]}/{k[1]}: {c}")
    report.elapsed_s = time.monotonic() - t_start
    return report


# -------------------------------------------------------------------------------------------- exact
def exact_row(job: Job, run_id: str, temperature: float, data: dict, latency_s: float) -> dict:
    """One `EXACT_SCHEMA` row from the exact endpoint's answer for one (role, scenario).

    Reads the serving app's `ExactResult.to_dict()` shape (services/teacher/engines/base.py): `p_C`, `p_D`,
    `valid_mass`, `invalid_mass`, `unresolved_mass`, and for the PGG `contributions` (answer -> probability)
    or `p` (same mapping), stored as `pgg_dist`, a JSON list over 0..endowment."""
    def num(name: str) -> float | None:
        v = data.get(name)
        return None if v is None else float(v)

    p = data.get("p") if isinstance(data.get("p"), dict) else {}
    valid_mass = num("valid_mass")
    if job.scenario.is_pgg:
        dist = data.get("contributions") or data.get("distribution") or p
        if not isinstance(dist, dict) or not dist:
            raise EndpointError(f"{job.label}: the exact endpoint gave no contribution distribution for the PGG")
        endowment = job.scenario.game.endowment  # type: ignore[union-attr]
        probs = {int(k): float(v) for k, v in dist.items()}
        pgg_dist = [probs.get(i, 0.0) for i in range(endowment + 1)]
        mass = valid_mass if valid_mass is not None else sum(pgg_dist)
        mean = num("mean_given_valid")
        if mean is None and mass > 0:
            mean = sum(i * v for i, v in enumerate(pgg_dist)) / mass
        p_c = p_d = p_cv = None
        distribution = json.dumps(pgg_dist)
    else:
        p_c = num("p_C") if data.get("p_C") is not None else (float(p["C"]) if "C" in p else None)
        p_d = num("p_D") if data.get("p_D") is not None else (float(p["D"]) if "D" in p else None)
        if p_c is None or p_d is None:
            raise EndpointError(f"{job.label}: the exact endpoint's answer has no p_C/p_D: {json.dumps(data)[:200]}")
        mass = valid_mass if valid_mass is not None else p_c + p_d
        p_cv = num("p_C_given_valid")
        if p_cv is None and mass > 0:
            p_cv = p_c / mass
        mean, distribution = None, None
    return {
        "run_id": run_id,
        "role": job.role,
        "model": job.model,
        "scenario_id": job.scenario.id,
        "family": job.scenario.family,
        "context": job.scenario.context.id,
        "game": job.scenario.game_id,
        "temperature": float(data.get("temperature", temperature)),
        "p_C": p_c,
        "p_D": p_d,
        "p_C_given_valid": p_cv,
        "valid_mass": mass,
        "invalid_mass": num("invalid_mass"),
        "unresolved_mass": num("unresolved_mass"),
        "pgg_dist": distribution,
        "mean_given_valid": mean,
        "messages": json.dumps(job.messages, ensure_ascii=False),
        "latency_s": float(latency_s),
        "raw": json.dumps(data, sort_keys=True, default=str),
    }


def exact_body(job: Job, temperature: float) -> dict:
    body: dict[str, Any] = {"model": job.model, "messages": job.messages, "temperature": temperature}
    if job.scenario.is_pgg:
        body["kind"] = "contribution"
        body["endowment"] = job.scenario.game.endowment  # type: ignore[union-attr]
    else:
        body["kind"] = "choice"
    return body


async def exact_async(
    store: ExactStore,
    jobs: list[Job],
    *,
    base_url: str,
    temperature: float,
    run_id: str,
    concurrency: int = 4,
    api_key: str | None = None,
    retry: RetryPolicy = RetryPolicy(),
    progress: bool | str | None = None,
    description: str = "exact",
    path: str = "/exact",
) -> RunReport:
    """One exact-mode call per (role, scenario) not yet in `store` (opened for writing); one row each."""
    t_start = time.monotonic()
    done = store.done()
    todo = [j for j in jobs if j.key not in done]
    report = RunReport(already=len(jobs) - len(todo))
    shared = _Shared(base_url=base_url, store_root=str(store.root), retry=retry, report=report,
                     kept=lambda: report.already + report.written)
    sem = asyncio.Semaphore(concurrency)
    client = _client(base_url, api_key, retry, concurrency)

    async def one(job: Job, bar: _Progress) -> None:
        async with sem:
            if shared.fatal is not None:
                raise _Aborted
            body = exact_body(job, temperature)
            bar.start(job)
            data, latency = await _with_retries(
                shared, f"{job.label} exact", lambda: client.post(path, cast_to=object, body=body))
            if not isinstance(data, dict):
                raise EndpointError(f"{job.label}: the exact endpoint answered {type(data).__name__}, not a JSON object")
            store.write([exact_row(job, run_id, temperature, data, latency)])
            report.requests += 1
            report.written += 1
            bar.advance(job, 1)

    try:
        with _Progress(_progress_enabled(progress), len(jobs), report.already, description,
                       lines=progress in (None, "lines")) as bar:
            for j in jobs:
                bar.add(j, 1 if j.key in done else 0)
            tasks = [asyncio.create_task(one(j, bar)) for j in todo]
            await _gather_or_abort(tasks, shared, client)
    finally:
        await client.close()
    left = {j.key for j in jobs} - store.done()
    if left:
        raise EndpointError(f"{store.root}: {len(left)} (role, scenario) pairs have no exact row after the run")
    report.counts = {j.key: 1 for j in jobs}
    report.elapsed_s = time.monotonic() - t_start
    return report
