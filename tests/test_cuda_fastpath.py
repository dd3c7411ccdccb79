"""The CUDA fast path's tensor code, run eagerly on CPU (no GPU here; graph capture and Triton itself need one).

Covers: the prompt forward in its static graph form (padded to a bucket) against the model's forward; decode steps
on the pooled graph buffers (prompt padded to its bucket and masked, span buckets, rows moved by `select`), with
the model's modules and with the compilable pure layer, against the dynamic CPU step; the log-sum-exp merge around
the suffix kernel against the one-softmax attention (the kernel replaced by its reference math).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.fixtures.tiny_models import tiny_model_dir
from tomtransfer.services.teacher.engines import cuda_fastpath
from tomtransfer.services.teacher.engines.cuda_fastpath import CudaGraphDecoder, GraphState, fused_layer
from tomtransfer.services.teacher.engines.decoder_ops import shared_prefix_attention
from tomtransfer.services.teacher.engines.decoding import DecodingOptions

OPTIONS = DecodingOptions(prompt_bucket=16, span_bucket=4)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    torch.set_num_threads(2)
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir(request.param, seed=3))).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def prompt(model, length: int = 37) -> list[int]:
    g = torch.Generator().manual_seed(length)
    return torch.randint(5, model.config.vocab_size, (length,), generator=g).tolist()


@pytest.mark.parametrize("length", [16, 37])
def test_static_prompt_forward_matches_the_model(model, length):
    dec = CudaGraphDecoder(model, OPTIONS, fuse=True)
    ids = prompt(model, length)
    with torch.inference_mode():
        ref = dec.prefill(ids)  # CPU: the model's own forward
        pg = dec._prefill_buffers(ids)
        logits = dec._prefill_static(pg)
    assert pg.tokens.shape[0] == 16 * -(-length // 16)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
    for (k, v), (rk, rv) in zip(pg.kv, ref.kv):
        torch.testing.assert_close(k[:, :length], rk, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v[:, :length], rv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compiled_form", [False, True])
def test_pooled_graph_steps_match_dynamic_steps(model, compiled_form):
    dec = CudaGraphDecoder(model, OPTIONS, fuse=True)
    if compiled_form:
        dec._layer = fused_layer  # what torch.compile wraps on CUDA, run eagerly
    ids = prompt(model)
    feeds = [[3, 4, 5], [6, 6, 7], [8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18], [19, 20, 21, 22]]
    with torch.inference_mode():
        pre = dec.prefill(ids)
        ref = dec.start(pre, 3, 8)  # CPU: plain buffers, dynamic steps
        g = dec._pooled(3, 8, pre)
        st = GraphState(prefix=g.prefix, rows=3, capacity=8, ks=g.ks, vs=g.vs, graph=g)
        assert g.prefix.kv[0][0].shape[1] == 48 and int(g.plen) == 37 and int(g.pmask.sum()) == 37
        for t, tok in enumerate(feeds):
            if t == 3:  # reorder and duplicate rows, as tree expansion does: the pooled path moves to a new shape
                index = torch.tensor([2, 0, 0, 1])
                dec.select(ref, index)
                dec.select(st, index)
                assert st.graph is not g and st.graph.ks[0].shape[0] == 4
            tok = torch.tensor(tok)
            span = min(8, -(-(t + 1) // dec.span_bucket) * dec.span_bucket)
            want = dec._forward(ref, tok, t, static=False)
            got = dec._forward(st, tok, torch.tensor([t]), static=True, span=span)
            ref.t += 1
            st.t += 1
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(dec._pool) <= dec.pool_size


def test_pool_is_bounded_and_reused(model):
    dec = CudaGraphDecoder(model, DecodingOptions(prompt_bucket=16, graph_pool=2), fuse=True)
    with torch.inference_mode():
        pre = dec.prefill(prompt(model))
        first = dec._pooled(2, 8, pre)
        assert dec._pooled(2, 8, pre) is first  # same (rows, capacity, prompt bucket): same buffers
        for rows in (3, 4, 5):
            dec._pooled(rows, 8, pre)
    assert len(dec._pool) == 2 and first not in dec._pool.values()


def test_suffix_kernel_merge_matches_one_softmax(monkeypatch):
    """`_suffix_kernel_attention` merges the prompt part and the kernel's suffix part by their log-sum-exps; with the
    kernel's contract computed by plain math (out, lse over each row's first `used` slots) it must equal the
    joint-softmax attention over [prompt, used suffix slots]."""
    def reference_kernel():
        def op(q, k, v, used, group):
            n = int(used)
            B, H, D = q.shape
            qg = q.view(B, H // group, group, D)
            out, lse = cuda_fastpath._attn_lse(qg, k[:, :, :n], v[:, :, :n], None)
            return out.reshape(B, H, D), lse.reshape(B, H)
        return op

    monkeypatch.setattr(cuda_fastpath, "_triton_suffix_op", reference_kernel)
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, D, L, cap, used = 3, 2, 2, 8, 11, 9, 6
    qg = torch.randn(B, Hkv, G, D, generator=g) * D ** -0.5
    kp, vp = torch.randn(Hkv, L, D, generator=g), torch.randn(Hkv, L, D, generator=g)
    ks, vs = torch.randn(B, Hkv, cap, D, generator=g), torch.randn(B, Hkv, cap, D, generator=g)
    pmask = torch.arange(L) < 9  # a padded prompt bucket
    got = cuda_fastpath._suffix_kernel_attention(qg, kp, vp, ks, vs, pmask, torch.tensor([used]))
    want = shared_prefix_attention(qg, kp, vp, ks[:, :, :used], vs[:, :, :used],
                                   torch.cat((pmask, torch.ones(used, dtype=bool))))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
