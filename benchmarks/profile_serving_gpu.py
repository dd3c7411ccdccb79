"""Where the GPU decode step's time goes (diagnostics for bench_serving_gpu; device only)."""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures.tiny_models import llama2_7b_config
from tomtransfer.services.teacher.engines.base import SamplingParams
from tomtransfer.services.teacher.engines.cuda_fastpath import CudaGraphDecoder
from tomtransfer.services.teacher.engines.decoding import DecodingOptions
from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine


def sync_time(fn, n=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main():
    dev = torch.device("cuda")
    cfg = llama2_7b_config()
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    spec = SimpleNamespace(model="x", engine="transformers", device="cuda", dtype="bfloat16", max_batch_size=300,
                           num_cpus=1.0)
    eng = TransformersEngine(spec, model=model, tokenizer=tok)  # default knobs: CUDA graphs on
    ids = torch.randint(10, 32000, (300,)).tolist()
    dec = eng.decoder
    print("fused", dec.fused is not None, "graphs", dec.graphs)
    from tomtransfer.services.teacher.engines.decoding import HFDecoder

    with torch.inference_mode():
        hf = HFDecoder(model)
        a, b = dec.prefill(ids[:50]), hf.prefill(ids[:50])
        sa, sb = dec.start(a, 4, 8, graph=False), hf.start(b, 4, 8)
        for step in range(3):
            tt = torch.randint(0, 32000, (4,), device=dev)
            la, lb = dec.step(sa, tt), hf.step(sb, tt)
            print("fast vs hf max |dlogit|", float((la - lb).abs().max()), "argmax agree",
                  float((la.argmax(-1) == lb.argmax(-1)).float().mean()))
        sg = dec.start(a, 4, 8)
        sg2 = dec.start(a, 4, 8, graph=False)
        for step in range(3):
            tt = torch.randint(0, 32000, (4,), device=dev)
            print("graph vs eager", float((dec.step(sg, tt) - dec.step(sg2, tt)).abs().max()))
        dec._pool.clear()
    with torch.inference_mode():
        pre = dec.prefill(ids)
        st = dec.start(pre, 300, 64)
        dec._graph_step(st, torch.zeros(300, dtype=torch.long, device=dev))
        toks = torch.randint(0, 32000, (300,), device=dev)
        st.t = 10
        print("graph step t=10", sync_time(lambda: dec._graph_step(st, toks)))
        st.t = 60
        print("graph step t=60", sync_time(lambda: dec._graph_step(st, toks)))
        st.t = 10
        print("eager step   ", sync_time(lambda: dec._forward(st, toks, 10, static=False)))
        t_idx = torch.tensor([10], device=dev)
        print("static eager ", sync_time(lambda: dec._forward(st, toks, t_idx, static=True)))
        x = torch.randn(300, 4096, device=dev, dtype=torch.bfloat16)
        w = torch.randn(11008, 4096, device=dev, dtype=torch.bfloat16)
        t = sync_time(lambda: torch.nn.functional.linear(x, w), 50)
        print("mlp gemm 300x4096x11008", t, "TFLOPS", 2 * 300 * 4096 * 11008 / t / 1e12)
        logits = torch.randn(300, 32000, device=dev)
        p = SamplingParams(n=300, temperature=0.8, max_tokens=64)
        rows = list(range(300))
        u = torch.rand(300, dtype=torch.float64)
        print("distribution ", sync_time(lambda: eng._distribution(logits, p)))
        probs, _ = eng._distribution(logits, p)
        print("inverse cdf  ", sync_time(lambda: eng._inverse_cdf(probs, rows, u)))
        params = SamplingParams(n=300, temperature=0.8, max_tokens=64, seed=0, ignore_eos=True)
        eng.sample_ids(ids, params)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            eng.sample_ids(ids, params)
            torch.cuda.synchronize()
            print("sample_ids", time.perf_counter() - t0)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    t0 = time.perf_counter()
    cdec = CudaGraphDecoder(model, DecodingOptions(compile=True))
    with torch.inference_mode():
        pre = cdec.prefill(ids)
        st = cdec.start(pre, 300, 64)
        st.t = 10
        cdec._graph_step(st, toks)
        print("compiled graph step: first (compile+capture) s", time.perf_counter() - t0)
        print("compiled graph step t=10", sync_time(lambda: cdec._graph_step(st, toks)))
        st.t = 60
        print("compiled graph step t=60", sync_time(lambda: cdec._graph_step(st, toks)))
        ref = dec.start(dec.prefill(ids), 300, 64, graph=False)
        a = cdec.step(cdec.start(pre, 300, 64), toks)
        b = dec.step(ref, toks)
        print("compiled vs eager max |dlogit|", float((a - b).abs().max()))
        from torch.profiler import ProfilerActivity, profile

        st.t = 40
        cdec._graph_step(st, toks)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                cdec._graph_step(st, toks)
            torch.cuda.synchronize()
        print("compiled graph step t=40, 5 replays:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        # the suffix attention alone (scores + values over the per-row cache), as bmm and as a fused reduction
        B, H, S, D = 300, 32, 48, 128
        q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
        kk = torch.randn(B, H, 64, D, device=dev, dtype=torch.bfloat16)[:, :, :S]
        vv = torch.randn(B, H, 64, D, device=dev, dtype=torch.bfloat16)[:, :, :S]

        def bmm_form():
            p_ = torch.softmax(torch.matmul(q, kk.transpose(-1, -2)), -1)
            return torch.matmul(p_, vv)

        def red_form(q, kk, vv):
            sc = (q.float() * kk.float()).sum(-1, keepdim=True)  # (B, H, S, 1)
            p_ = torch.softmax(sc, dim=-2)
            return (p_ * vv.float()).sum(-2, keepdim=True).to(q.dtype)

        cred = torch.compile(red_form, dynamic=False)
        print("suffix attn S=48 bmm form", sync_time(bmm_form, 50))
        print("suffix attn S=48 compiled reduction form", sync_time(lambda: cred(q, kk, vv), 50),
              "max diff", float((cred(q, kk, vv) - bmm_form()).abs().max()))
        print("suffix K+V bytes at S=48 / 4.8 TB/s:", 2 * B * H * S * D * 2 / 4.8e12)


if __name__ == "__main__":
    main()
