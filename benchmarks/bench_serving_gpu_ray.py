"""The Ray Serve app on GPUs (transformers engine) vs the same engine called directly: the cost of Serve + HTTP.

What runs is the product: `services.teacher.serving.start` deploys `services.teacher.app` (Ray Serve, the
OpenAI-compatible ingress + one ModelServer replica per role) for `configs/gpu.yaml`, with a Llama-2-7B-shaped
teacher (random bf16 weights, written once to `--model-dir` with the stand-in tokenizer). Then:

  direct    `TransformersEngine.chat` / `.exact` in this process (same spec, same GPU kind), no Ray, no HTTP
  http      the same requests through the app with the `openai` client (`chat.completions.create`, and
            `client.post("/exact")` for the exact-mode route)
  generate  `services.collector.generate.generate` through the app: 20 in-sample scenarios x 300 motivated
            samples (`--gen-max-tokens`, one request of n=300 per scenario, two teacher replicas, one per GPU)

The request: one in-sample scenario's motivated prompt, n=300, max_tokens 64, ignore_eos (every sample is
64 tokens long, as the random weights seldom draw EOS), T = 0.8. Median of `--repeats` calls after a warm-up.
Results: $OUT/gpu_ray_serving.json (written after every phase).

  python3 -m benchmarks.bench_serving_gpu_ray --data build/gpu-ray        # device (ray + wheels installed)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_model(data: Path, model_dir: Path) -> None:
    """A Llama-2-7B-shaped model with random bf16 weights (drawn on the GPU) and the stand-in tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (model_dir / "config.json").is_file():
        return
    cfg = AutoConfig.from_pretrained(data / "student")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(data / "student").save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()


SMOKE = os.environ.get("TOMTRANSFER_BENCH_SMOKE") == "1"  # CPU dry run: a tiny model, no GPU


def _cfg(model_dir: Path, out_dir: Path, gen_max_tokens: int):
    from tomtransfer.shared.config import load_config

    cfg = load_config(ROOT / "configs" / "gpu.yaml")
    where = {"device": "cpu", "dtype": "float32", "num_gpus": 0, "num_cpus": 0.5} if SMOKE else {}
    teacher = cfg.models.teacher.model_copy(update={"model": str(model_dir), **where})
    # the student role serves the same folder: the stand-in student folder has no weights
    student = cfg.models.student.model_copy(update={"model": str(model_dir), **where})
    sampling = cfg.sampling.model_copy(update={"max_tokens": gen_max_tokens})
    return cfg.model_copy(update={"output_dir": out_dir, "sampling": sampling,
                                  "models": cfg.models.model_copy(update={"teacher": teacher, "student": student})})


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    fn()  # warm-up (CUDA graphs, prefix cache, connection)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/tomtransfer-model7b"))
    ap.add_argument("--scenario", default="IR_prison")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--phases", default="direct,http,generate")
    ap.add_argument("--gen-max-tokens", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_ray_serving.json")
    args = ap.parse_args()
    phases = args.phases.split(",")

    import torch

    from tomtransfer.shared.prompts import build_messages
    from tomtransfer.shared.scenarios import default_catalog

    if SMOKE:
        from tests.fixtures.tiny_models import tiny_model_dir

        args.model_dir = tiny_model_dir()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "gpus": torch.cuda.device_count(), "torch": torch.__version__, "scenario": args.scenario,
                 "samples": args.samples, "max_tokens": args.max_tokens, "temperature": 0.8}

    def save() -> None:
        args.out.write_text(json.dumps(res, indent=1, default=str))

    t0 = time.perf_counter()
    write_model(args.data, args.model_dir)
    res["write_model_s"] = time.perf_counter() - t0
    cfg = _cfg(args.model_dir, Path("/tmp/gpu-ray-serving-runs"), args.gen_max_tokens)
    msgs = tuple(build_messages(default_catalog().scenarios[args.scenario], "answer_motivation"))

    if "direct" in phases:
        from tomtransfer.services.teacher.engines.base import ChatRequest, ExactRequest, SamplingParams
        from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine

        t0 = time.perf_counter()
        eng = TransformersEngine(cfg.models.teacher)
        res["direct_load_s"] = time.perf_counter() - t0
        params = SamplingParams(n=args.samples, temperature=0.8, max_tokens=args.max_tokens, seed=1, ignore_eos=True)
        req = ChatRequest(messages=msgs, params=params)
        times, out = _timed(lambda: asyncio.run(eng.chat(req)), args.repeats)
        res["direct_sample"] = {**_summary(times), "prompt_tokens": out.prompt_tokens,
                                "completion_tokens": out.completion_tokens}
        ereq = ExactRequest(messages=msgs, temperature=0.8)
        times, xr = _timed(lambda: asyncio.run(eng.exact(ereq)), args.repeats)
        res["direct_exact"] = {**_summary(times), "p": xr.p, "valid_mass": xr.valid_mass}
        print("direct", res["direct_sample"]["median_s"], res["direct_exact"]["median_s"], flush=True)
        save()
        del eng
        torch.cuda.empty_cache()

    if "http" in phases or "generate" in phases:
        import openai

        from tomtransfer.services.teacher import serving

        t0 = time.perf_counter()
        url = serving.start(cfg, wait_ready=False)
        try:
            serving._wait_ready(url, timeout=240)
        except RuntimeError as err:  # say why (pending resources, a replica's start-up error) before giving up
            from ray import serve

            res["serve_error"] = f"{err}; status: {serve.status()}"[:4000]
            save()
            serving.stop()
            raise
        res["serve_start_s"] = time.perf_counter() - t0
        res["url"] = url
        print("serving on", url, "after", res["serve_start_s"], flush=True)
        save()
        client = openai.OpenAI(base_url=url, api_key="unused", timeout=600, max_retries=0)

        def http() -> None:
            def sample():
                return client.chat.completions.create(
                    model="teacher", messages=list(msgs), n=args.samples, max_tokens=args.max_tokens,
                    temperature=0.8, seed=1, extra_body={"ignore_eos": True})

            times, out = _timed(sample, args.repeats)
            res["http_sample"] = {**_summary(times), "choices": len(out.choices),
                                  "completion_tokens": out.usage.completion_tokens,
                                  "engine_timings": (out.model_extra or {}).get("timings")}
            body = {"model": "teacher", "messages": list(msgs), "temperature": 0.8}
            times, xr = _timed(lambda: client.post("/exact", body=body, cast_to=object), args.repeats)
            res["http_exact"] = {**_summary(times), "p": xr.get("p"), "valid_mass": xr.get("valid_mass")}
            for k in ("sample", "exact"):
                if f"direct_{k}" in res:
                    res[f"serve_http_overhead_{k}_s"] = res[f"http_{k}"]["median_s"] - res[f"direct_{k}"]["median_s"]
            print("http", res["http_sample"]["median_s"], res["http_exact"]["median_s"], flush=True)

        def gen() -> None:
            from tomtransfer.services.collector.generate import generate

            t0 = time.perf_counter()
            g = generate(cfg, base_url=url, progress=False)
            wall = time.perf_counter() - t0
            res["generate"] = {"wall_s": wall, "scenarios": len(g.scenarios), "samples_per_scenario": 300,
                               "max_tokens": args.gen_max_tokens, "teacher_replicas": 2,
                               "training_examples": getattr(g.dataset, "examples", None),
                               "report": {k: v for k, v in vars(g.report).items()
                                          if isinstance(v, (int, float, str))}}
            print("generate", res["generate"], flush=True)

        try:
            for name, fn in (("http", http), ("generate", gen)):
                if name in phases:
                    try:
                        fn()
                    except Exception as err:  # noqa: BLE001 - one failing phase must not cost the others
                        import traceback

                        traceback.print_exc()
                        res[f"{name}_error"] = f"{type(err).__name__}: {err}"[:2000]
                    save()
        finally:
            serving.stop()
    save()
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
