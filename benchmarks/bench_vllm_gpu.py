"""vLLM on the GPU beside the home-made engine: the project's `VLLMEngine` and `TransformersEngine` on the same
Llama-2-7B-shaped random-weight model, the same 300-token prompt, 300 samples x 64 tokens (T 0.8, EOS ignored)
and the same exact-mode call as `bench_serving_gpu`.

One difference from `bench_serving_gpu`: both engines here use the stand-in tokenizer padded with added tokens
`<xN>` up to the model's 32000 ids (vLLM detokenizes every sampled id; the unpadded 600-token stand-in has no text
for most of them). Exact mode then reads those ids as real tokens that decide "invalid" instead of as ids the
tokenizer lacks: the same frontier, a few more child texts decoded per step.

Parts (each its own process: vLLM's engine core wants the GPU memory the home-made engine holds); the
transformers part pads bench_serving_gpu's saved stand-in tokenizer itself (or takes one `--prepare` wrote):
  python3 -m benchmarks.bench_vllm_gpu --part transformers --tokenizer .bench/serving-gpu --model-dir /tmp/m7b \\
      --out $OUT/vllm_gpu_transformers.json     # device: builds the model, writes it to --model-dir, measures
  python3 -m benchmarks.bench_vllm_gpu --part vllm --model-dir /tmp/m7b --out $OUT/vllm_gpu_vllm.json
The vLLM part measures the project's engine as configured for serving (one seeded request of n = 300, as
`VLLMEngine.chat` sends it) and, for reference, the same request unseeded (vLLM's batched sampler without
per-request generators), plus the engine's start-up (weights, torch.compile, CUDA-graph capture).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

PAD_TO = 32000


def prepare(folder: str) -> None:
    from tests.fixtures.tiny_models import train_tokenizer

    tok = train_tokenizer()
    tok.add_tokens([f"<x{i}>" for i in range(len(tok), PAD_TO)])
    tok.save_pretrained(folder)
    print(f"padded tokenizer ({len(tok)} tokens) saved to {folder}")


def prompt_ids(vocab: int, length: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(1)  # the same prompt as bench_serving_gpu
    return torch.randint(10, vocab, (length,), generator=g).tolist()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(fn, repeats: int) -> tuple[float, list[float], object]:
    runs, out = [], None
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        runs.append(time.perf_counter() - t0)
    return min(runs), runs, out


def part_transformers(args, results: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tomtransfer.services.teacher.engines.base import ExactRequest, SamplingParams
    from tomtransfer.services.teacher.engines.decoding import DecodingOptions
    from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine
    from tests.fixtures.tiny_models import llama2_7b_config

    cfg = llama2_7b_config()
    cfg.num_hidden_layers = args.layers
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tok) < cfg.vocab_size:  # bench_serving_gpu's stand-in: pad it as --prepare does
        tok.add_tokens([f"<x{i}>" for i in range(len(tok), cfg.vocab_size)])
    results["tokenizer_size"] = len(tok)
    results["model_build_s"] = time.perf_counter() - t0
    if args.model_dir:
        t0 = time.perf_counter()
        model.save_pretrained(args.model_dir)
        tok.save_pretrained(args.model_dir)
        results["model_write_s"] = time.perf_counter() - t0
    ids = prompt_ids(cfg.vocab_size, args.prompt)
    params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.new, seed=0,
                            ignore_eos=True)
    spec = dict(model="llama2-7b-random", engine="transformers", device=args.device, dtype="bfloat16",
                max_batch_size=args.samples, num_cpus=1.0)
    for name, knobs in (("engine", DecodingOptions()), ("engine_compiled", DecodingOptions(compile=True))):
        if args.only and name not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        eng = TransformersEngine(SimpleNamespace(**spec, decoding=knobs), model=model, tokenizer=tok)
        eng._pool.submit(lambda: None).result()
        eng.sample_ids(ids, params)
        first = time.perf_counter() - t0
        best, runs, res = best_of(lambda e=eng: e.sample_ids(ids, params), args.repeats)
        assert len(res.choices) == args.samples and all(c.num_tokens == args.new for c in res.choices)
        req = ExactRequest(messages=(), temperature=args.temperature)
        eng.exact_ids(ids, req)
        bx, xruns, x = best_of(lambda e=eng: e.exact_ids(ids, req), max(args.repeats, 5))
        results[name] = {"sample_s": best, "sample_runs": runs, "tokens_per_s": args.samples * args.new / best,
                         "first_call_s": first, "exact_s": bx, "exact_runs": xruns,
                         "exact_forward_passes": x.forward_passes, "exact_p": x.p, "exact_valid_mass": x.valid_mass,
                         "exact_unresolved_mass": x.unresolved_mass}
        print(name, json.dumps(results[name]), flush=True)
        del eng
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def part_vllm(args, results: dict) -> None:
    import torch
    import vllm

    from tomtransfer.services.teacher.engines.base import ChatRequest, ExactRequest, SamplingParams
    from tomtransfer.services.teacher.engines.vllm_engine import VLLMEngine

    results["vllm"] = vllm.__version__
    ids = prompt_ids(PAD_TO, args.prompt)
    kwargs = {"max_num_seqs": args.max_num_seqs, "gpu_memory_utilization": 0.85,
              "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256, 320]}}
    if args.eager:
        kwargs["enforce_eager"] = True
    kwargs.update(json.loads(args.engine_kwargs))
    spec = SimpleNamespace(model="llama2-7b-random", engine="vllm", device="cuda", dtype="bfloat16",
                           max_batch_size=args.samples, num_cpus=1.0, vllm_engine_kwargs=kwargs)
    results["engine_kwargs"] = kwargs

    async def run() -> None:
        t0 = time.perf_counter()
        eng = VLLMEngine(spec, model_path=args.model_dir)
        results["start_s"] = time.perf_counter() - t0
        print("vllm engine started", round(results["start_s"], 1), "s", flush=True)
        eng.prompt_ids = lambda messages: list(ids)  # the token-id workload (no chat template)
        try:
            req = ChatRequest(messages=(), params=SamplingParams(
                n=args.samples, temperature=args.temperature, max_tokens=args.new, seed=0, ignore_eos=True))

            async def timed(coro_fn, repeats):
                runs, out = [], None
                for _ in range(repeats):
                    t = time.perf_counter()
                    out = await coro_fn()
                    runs.append(time.perf_counter() - t)
                return min(runs), runs, out

            t = time.perf_counter()
            await eng.chat(req)
            first = time.perf_counter() - t
            best, runs, res = await timed(lambda: eng.chat(req), args.repeats)
            assert len(res.choices) == args.samples and all(c.num_tokens == args.new for c in res.choices)
            results["engine"] = {"sample_s": best, "sample_runs": runs, "first_call_s": first,
                                 "tokens_per_s": args.samples * args.new / best}
            print("vllm engine", json.dumps(results["engine"]), flush=True)

            from vllm import SamplingParams as VSP
            from vllm.sampling_params import RequestOutputKind

            sp = VSP(n=args.samples, temperature=args.temperature, max_tokens=args.new, ignore_eos=True,
                     output_kind=RequestOutputKind.FINAL_ONLY)

            async def unseeded():
                await eng._prefill(ids, None)
                return await eng._generate_final(ids, sp, None)

            await unseeded()
            best_u, runs_u, out = await timed(unseeded, args.repeats)
            assert len(out.outputs) == args.samples
            results["unseeded"] = {"sample_s": best_u, "sample_runs": runs_u,
                                   "tokens_per_s": args.samples * args.new / best_u}
            print("vllm unseeded", json.dumps(results["unseeded"]), flush=True)

            xreq = ExactRequest(messages=(), temperature=args.temperature)
            t = time.perf_counter()
            await eng.exact(xreq)
            xfirst = time.perf_counter() - t
            bx, xruns, x = await timed(lambda: eng.exact(xreq), max(args.repeats, 5))
            results["exact"] = {"exact_s": bx, "exact_runs": xruns, "first_call_s": xfirst,
                                "exact_forward_passes": x.forward_passes, "exact_p": x.p,
                                "exact_valid_mass": x.valid_mass, "exact_unresolved_mass": x.unresolved_mass}
            print("vllm exact", json.dumps(results["exact"]), flush=True)
        finally:
            await eng.close()

    results["gpu"] = torch.cuda.get_device_name(0)
    asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", default=None, help="save the padded stand-in tokenizer to this folder and exit")
    ap.add_argument("--part", choices=("transformers", "vllm"))
    ap.add_argument("--tokenizer", default=None, help="the folder --prepare wrote")
    ap.add_argument("--model-dir", default=None, help="transformers part: write the model here; vllm: read it")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--only", default="", help="transformers part: engine,engine_compiled")
    ap.add_argument("--max-num-seqs", type=int, default=320, help="vLLM: the engine default caps at 256")
    ap.add_argument("--eager", action="store_true", help="vLLM: enforce_eager (no compile, no CUDA graphs)")
    ap.add_argument("--engine-kwargs", default="{}", help="vLLM: JSON merged over the engine kwargs")
    ap.add_argument("--device", default="cuda", help="transformers part: cpu for a smoke run of the script")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    import torch

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
                     "torch": torch.__version__, "part": args.part, "samples": args.samples,
                     "prompt_tokens": args.prompt, "new_tokens": args.new, "temperature": args.temperature,
                     "layers": args.layers}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
    try:
        if args.part == "transformers":
            part_transformers(args, results)
        else:
            part_vllm(args, results)
    finally:
        print(json.dumps(results, indent=2))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
