"""Where the host time of an exact-mode call goes (GPU, Llama-2-7B shape, random bf16 weights): cProfile over
repeated `exact_ids` calls after a warm-up, sorted by own time. Run on the device like bench_serving_gpu:
    python3 -m benchmarks.profile_exact_gpu --tokenizer .bench/serving-gpu [--compile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.fixtures.tiny_models import llama2_7b_config
    from tomtransfer.services.teacher.engines.base import ExactRequest
    from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine

    cfg = llama2_7b_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    from tomtransfer.services.teacher.engines.decoding import DecodingOptions

    spec = SimpleNamespace(model="llama2-7b-random", engine="transformers", device="cuda", dtype="bfloat16",
                           max_batch_size=300, num_cpus=1.0, decoding=DecodingOptions(compile=args.compile))
    eng = TransformersEngine(spec, model=model, tokenizer=tok)
    eng._pool.submit(lambda: None).result()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, cfg.vocab_size, (300,), generator=g).tolist()
    req = ExactRequest(messages=(), temperature=0.8)
    for _ in range(3):
        eng.exact_ids(ids, req)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(args.calls):
        eng.exact_ids(ids, req)
    torch.cuda.synchronize()
    prof.disable()
    print(f"{(time.perf_counter() - t0) / args.calls * 1000:.2f} ms per call (profiled)")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())


if __name__ == "__main__":
    main()
