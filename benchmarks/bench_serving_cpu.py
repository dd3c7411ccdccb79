"""CPU serving benchmark: 300 samples of one in-sample scenario from the demo student (SmolLM2-135M-Instruct).

Three ways to get the scenario's answer distribution (T = 0.8, `answer_only` prompt, max_tokens 16):
- loop        one sample per call: `model.generate(do_sample=True)` per sample, prompt prefilled every time
              (the paper's loop); timed on `--loop-samples` calls and scaled to 300;
- engine_n1   the engine called with n=1 per sample (same loop through our engine), timed likewise;
- batched     one engine call with n=300: one prefill, all rows decoded together (shared prompt cache,
              one row per distinct prefix);
- batched_stop  the same with `stop_at_answer="choice"` (each sample ends once its leading answer is decided);
- exact       one exact-mode call (no samples at all: P(C), P(D), valid mass).
Reports seconds and ratios against the loop. Threads: `--threads` (default 2). The machine is shared, so the
load average before and after is recorded with the numbers.

Run: `.venv/bin/python -m benchmarks.bench_serving_cpu [--out FILE]` (needs `tomtransfer models fetch
smollm2-135m-instruct`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--scenario", default="IR_prison")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--loop-samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from tomtransfer.services.common.models import resolve_model
    from tomtransfer.services.teacher.engines.base import ExactRequest, SamplingParams
    from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine
    from tomtransfer.services.teacher.exact import lead_choice
    from tomtransfer.shared.config import ModelSpec
    from tomtransfer.shared.prompts import build_messages
    from tomtransfer.shared.scenarios import default_catalog

    path = str(resolve_model(args.model))
    eng = TransformersEngine(ModelSpec(model=path, device="cpu", max_batch_size=args.samples))
    eng._pool.submit(lambda: None).result()
    msgs = tuple(build_messages(default_catalog().scenarios[args.scenario], "answer_only"))
    ids = eng.prompt_ids(msgs)
    T, n, M = args.temperature, args.samples, args.max_tokens
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpus": os.cpu_count(),
                 "threads": args.threads, "model": args.model, "scenario": args.scenario, "samples": n,
                 "prompt_tokens": len(ids), "max_tokens": M, "temperature": T, "torch": torch.__version__,
                 "loadavg_before": os.getloadavg()}

    def clock(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    p1 = SamplingParams(n=1, temperature=T, max_tokens=M, seed=0)
    eng.sample_ids(ids, p1)  # warm-up
    # the paper's loop: generate() per sample
    x = torch.tensor([ids])
    gen_kw = dict(do_sample=True, temperature=T, top_p=1.0, top_k=0, max_new_tokens=M,
                  eos_token_id=sorted(eng.end_ids), pad_token_id=0)
    with torch.inference_mode():
        t, _ = clock(lambda: [eng.base.generate(x, **gen_kw) for _ in range(args.loop_samples)])
    res["loop"] = {"seconds_per_sample": t / args.loop_samples, "seconds": t / args.loop_samples * n,
                   "timed_samples": args.loop_samples}
    print("loop", res["loop"], flush=True)
    t, _ = clock(lambda: [eng.sample_ids(ids, SamplingParams(n=1, temperature=T, max_tokens=M, seed=i))
                          for i in range(args.loop_samples)])
    res["engine_n1"] = {"seconds_per_sample": t / args.loop_samples, "seconds": t / args.loop_samples * n,
                        "timed_samples": args.loop_samples}
    print("engine_n1", res["engine_n1"], flush=True)
    for name, extra in (("batched", {}), ("batched_stop", {"stop_at_answer": "choice"})):
        t, r = clock(lambda e=extra: eng.sample_ids(ids, SamplingParams(n=n, temperature=T, max_tokens=M, seed=1, **e)))
        c = sum(lead_choice(ch.text) == "C" for ch in r.choices)
        d = sum(lead_choice(ch.text) == "D" for ch in r.choices)
        res[name] = {"seconds": t, "prefill_s": r.timings["prefill_s"], "decode_s": r.timings["decode_s"],
                     "completion_tokens": r.completion_tokens, "C": c, "D": d}
        print(name, res[name], flush=True)
    req = ExactRequest(messages=msgs, temperature=T)
    t, xr = clock(lambda: eng.exact_ids(ids, req))
    res["exact"] = {"seconds": t, "p_C": xr.p["C"], "p_D": xr.p["D"], "valid_mass": xr.valid_mass,
                    "unresolved_mass": xr.unresolved_mass, "forward_passes": xr.forward_passes}
    print("exact", res["exact"], flush=True)
    loop = res["loop"]["seconds"]
    res["ratios_vs_loop"] = {k: loop / res[k]["seconds"] for k in ("engine_n1", "batched", "batched_stop", "exact")}
    res["loadavg_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
