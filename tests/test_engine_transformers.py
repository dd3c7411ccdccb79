"""The transformers engine on tiny random-weight models of real architectures (fast, no Ray).

Covers: the shared-prefix decoder against the plain HF forward (llama + qwen2, with dedup/select and with a
LoRA adapter), sampling semantics (seed, n/chunks, stop strings, max_tokens, ignore_eos, greedy, top_p,
logprobs), that sampled first tokens follow softmax(logits/T), adapters (change / restore / several at once /
bad folder), and exact mode against sampling with `stop_at_answer`.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest
import torch

from tests.fixtures.tiny_models import tiny_model_dir
from tomtransfer.services.teacher.engines.base import ChatRequest, EngineInputError, ExactRequest, SamplingParams, create_engine
from tomtransfer.services.teacher.engines.cuda_fastpath import CudaGraphDecoder, fused_layer
from tomtransfer.services.teacher.engines.decoding import DecodingOptions, HFDecoder, SharedPrefixDecoder
from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine
from tomtransfer.services.teacher.exact import lead_choice, lead_contribution
from tomtransfer.shared.config import ModelSpec
from tomtransfer.shared.prompts import build_messages
from tomtransfer.shared.scenarios import default_catalog

MSGS = ({"role": "system", "content": "Answer with C or D."}, {"role": "user", "content": "Which one, C or D?"})


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def engine(request):
    torch.set_num_threads(2)
    path = tiny_model_dir(request.param, seed=3)
    e = TransformersEngine(ModelSpec(model=str(path), device="cpu", max_batch_size=64))
    yield e
    run(e.close())


@pytest.fixture(scope="module")
def llama():
    path = tiny_model_dir("llama", seed=3)
    e = TransformersEngine(ModelSpec(model=str(path), device="cpu", max_batch_size=64))
    yield e
    run(e.close())


def make_lora(engine: TransformersEngine, out, seed: int, scale: float = 1.0):
    """A random LoRA (nonzero B, so it changes outputs) saved as a peft adapter folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(engine.model_path)
    torch.manual_seed(seed)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.mul_(scale)
    peft.save_pretrained(str(out))
    return str(out)


def chat(engine, **kw):
    params = SamplingParams(**{"n": 1, "temperature": 1.0, "max_tokens": 8, "seed": 0, **kw})
    return run(engine.chat(ChatRequest(messages=MSGS, params=params)))


# ------------------------------------------------------------------------------------ decoders agree
def test_engine_registry_and_info(engine):
    assert engine.info()["decoder"] == "shared_prefix"
    assert isinstance(create_engine(ModelSpec(model=engine.model_path, device="cpu")), TransformersEngine)
    ids = engine.prompt_ids(MSGS)
    text = engine.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "Which one, C or D?" in text  # chat template applied


def test_compile_is_configuration():
    """`decoding: {compile: true}` on a model reaches the engine; off by default. On CPU it changes nothing: the
    compiled layer and draw belong to the CUDA fast path, which is not used there."""
    path = str(tiny_model_dir("llama", seed=3))
    off = TransformersEngine(ModelSpec(model=path, device="cpu"))
    on = TransformersEngine(ModelSpec(model=path, device="cpu", decoding={"compile": True}))
    try:
        assert (off.compile, on.compile) == (False, True)
        assert type(on.decoder) is SharedPrefixDecoder and not on.graphs  # CPU: not the CUDA subclass
        assert on._draw_rows is None and not hasattr(on.decoder, "_layer")  # CPU: nothing compiled
        assert [c.text for c in chat(on, n=4, seed=2).choices] == [c.text for c in chat(off, n=4, seed=2).choices]
    finally:
        run(off.close())
        run(on.close())


@pytest.mark.parametrize("with_adapter", [False, True])
def test_shared_prefix_decoder_matches_hf(engine, tmp_path, with_adapter):
    if with_adapter:
        run(engine.load_adapter("a", make_lora(engine, tmp_path / "a", seed=1)))
    try:
        ids = engine.prompt_ids(MSGS)
        fast, slow = SharedPrefixDecoder(engine.model), HFDecoder(engine.model)
        with engine._adapter("a" if with_adapter else None), torch.inference_mode():
            pf, ps = fast.prefill(ids), slow.prefill(ids)
            torch.testing.assert_close(pf.logits, ps.logits)
            sf, ss = fast.start(pf, 3, 6), slow.start(ps, 3, 6)
            feeds = [[5, 6, 7], [8, 8, 9], [10, 11, 12], [1, 2, 3]]
            for step, tok in enumerate(feeds):
                if step == 2:  # reorder/duplicate rows, as dedup and tree expansion do
                    index = torch.tensor([2, 0, 0])
                    fast.select(sf, index)
                    slow.select(ss, index)
                t = torch.tensor(tok)
                torch.testing.assert_close(fast.step(sf, t), slow.step(ss, t), rtol=1e-4, atol=1e-4)
    finally:
        if with_adapter:
            run(engine.unload_adapter("a"))


def test_prefix_cache_hits_equal_misses(engine, tmp_path):
    """Scenario prompts are computed as system turn + rest; a cached system turn gives bit-identical samples and
    exact probabilities, the split agrees with one whole-prompt forward, and adapter changes empty the cache."""
    cat = default_catalog().scenarios
    msgs = build_messages(cat["IR_prison"])
    ids, split = engine.prompt(msgs)
    assert 16 <= split < len(ids) and engine.tokenizer.decode(ids[:split]).rstrip().endswith("<|im_end|>")
    engine.prefixes.clear()
    hits0 = engine.prefixes.hits
    params = SamplingParams(n=6, temperature=1.0, max_tokens=6, seed=11)
    miss = run(engine.chat(ChatRequest(messages=msgs, params=params)))
    miss_x = run(engine.exact(ExactRequest(messages=msgs, temperature=1.0)))
    assert engine.prefixes.stats()["entries"] == 1 and engine.prefixes.hits == hits0 + 1  # exact reused chat's
    engine.prefixes.clear()
    run(engine.exact(ExactRequest(messages=build_messages(cat["IR_staghunt"]), temperature=1.0)))  # fills the cache
    hit_x = run(engine.exact(ExactRequest(messages=msgs, temperature=1.0)))
    hit = run(engine.chat(ChatRequest(messages=msgs, params=params)))
    assert engine.prefixes.hits >= hits0 + 3
    assert [c.text for c in hit.choices] == [c.text for c in miss.choices]
    assert hit_x.p == miss_x.p and hit_x.top_tokens == miss_x.top_tokens
    with torch.inference_mode():
        whole = engine.decoder.prefill(ids)
        split_pf = engine._prefill(ids, split, None)
    torch.testing.assert_close(split_pf.logits, whole.logits, rtol=1e-4, atol=1e-4)
    run(engine.load_adapter("pc", make_lora(engine, tmp_path / "pc", seed=4, scale=3.0)))
    try:
        assert engine.prefixes.stats()["entries"] == 0
        ad = run(engine.exact(ExactRequest(messages=msgs, temperature=1.0, adapter="pc")))
        base = run(engine.exact(ExactRequest(messages=msgs, temperature=1.0)))
        assert engine.prefixes.stats()["entries"] == 2  # one per adapter (None = the base)
        assert ad.top_tokens != base.top_tokens and base.p == pytest.approx(miss_x.p, abs=1e-6)
    finally:
        run(engine.unload_adapter("pc"))
    assert engine.prefixes.stats()["entries"] == 0


@pytest.mark.parametrize("fuse", [False, True])
def test_static_graph_step_matches_dynamic_step(engine, fuse):
    """The CUDA-graph form of a decode step (masked full buffer, step index as a tensor), run eagerly on CPU by the
    CUDA fast path's decoder, with separate and with fused (CUDA's default) q/k/v and gate/up weights."""
    ids = engine.prompt_ids(MSGS)
    dec = CudaGraphDecoder(engine.model, DecodingOptions(), fuse=fuse)
    assert (dec.fused is not None) == fuse and not dec.graphs and not dec.triton_suffix
    with torch.inference_mode():
        pre = dec.prefill(ids)
        a, b = dec.start(pre, 2, 5), dec.start(pre, 2, 5)
        for t, tok in enumerate([[3, 4], [5, 6], [7, 7]]):
            tok = torch.tensor(tok)
            la = dec._forward(a, tok, t, static=False)
            lb = dec._forward(b, tok, torch.tensor([t]), static=True, span=4 if t < 3 else None)
            a.t += 1
            b.t += 1
            torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    if fuse:  # the pure (compilable) layer function agrees too
        dec._layer = fused_layer
        with torch.inference_mode():
            c = dec.start(pre, 2, 5)
            a2 = dec.start(pre, 2, 5)
            for t, tok in enumerate([[3, 4], [5, 6]]):
                tok = torch.tensor(tok)
                la = dec._forward(a2, tok, t, static=False)
                lc = dec._forward(c, tok, torch.tensor([t]), static=True)
                a2.t += 1
                c.t += 1
                torch.testing.assert_close(la, lc, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_chunked(engine):
    a = chat(engine, n=20, seed=7)
    b = chat(engine, n=20, seed=7)
    c = chat(engine, n=20, seed=8)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert [x.text for x in a.choices] != [x.text for x in c.choices]
    old = engine.max_batch_size
    engine.max_batch_size = 7  # 150 samples in chunks of 7 rows, one prompt prefill
    try:
        r = chat(engine, n=150, seed=1, max_tokens=3)
    finally:
        engine.max_batch_size = old
    assert len(r.choices) == 150 and r.timings["rows_per_chunk"] == 7
    assert r.completion_tokens == sum(c.num_tokens for c in r.choices)
    assert all(1 <= c.num_tokens <= 3 for c in r.choices)


def test_max_tokens_ignore_eos_and_greedy(engine):
    r = chat(engine, n=5, max_tokens=6, ignore_eos=True)
    assert all(c.num_tokens == 6 and c.finish_reason == "length" for c in r.choices)
    g = chat(engine, n=4, temperature=0.0, max_tokens=5)
    assert len({c.text for c in g.choices}) == 1
    ids = engine.prompt_ids(MSGS)
    with torch.inference_mode():
        greedy = engine.base.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                      eos_token_id=sorted(engine.end_ids), pad_token_id=0)[0, len(ids):].tolist()
    greedy = [t for t in greedy if t not in engine.end_ids]
    assert g.choices[0].text == engine.tokenizer.decode(greedy, skip_special_tokens=True)


def test_stop_strings_cut_text(engine):
    free = chat(engine, n=30, seed=3, max_tokens=12, ignore_eos=True)
    # a stop string that occurs in some samples: a short piece of the first sample's text
    text = next(c.text for c in free.choices if len(c.text) > 6)
    stop = text[2:4]
    r = chat(engine, n=30, seed=3, max_tokens=12, ignore_eos=True, stop=(stop,))
    hit = 0
    for c_free, c in zip(free.choices, r.choices):
        if stop in c_free.text:
            hit += 1
            assert c.finish_reason == "stop" and stop not in c.text
            assert c_free.text.startswith(c.text)
    assert hit >= 1


def test_logprobs(engine):
    r = chat(engine, n=3, temperature=0.7, max_tokens=4, logprobs=True, top_logprobs=3, ignore_eos=True)
    ids = engine.prompt_ids(MSGS)
    with torch.inference_mode():
        logits = engine.base(torch.tensor([ids])).logits[0, -1]
    ref = torch.log_softmax(logits / 0.7, -1)
    for c in r.choices:
        assert len(c.logprobs) == 4
        first = c.logprobs[0]
        assert len(first.top_logprobs) == 3
        assert first.top_logprobs[0].logprob >= first.top_logprobs[1].logprob >= first.top_logprobs[2].logprob
        assert math.isclose(first.top_logprobs[0].logprob, float(ref.max()), abs_tol=1e-4)
        assert first.logprob <= first.top_logprobs[0].logprob + 1e-6


def test_first_token_frequencies_follow_softmax_T(llama):
    """4000 one-token samples: counts of the 5 likeliest tokens within 4 sd of n * softmax(logits/T)."""
    T, n = 0.7, 4000
    r = chat(llama, n=n, temperature=T, max_tokens=1, seed=11, ignore_eos=True)
    ids = llama.prompt_ids(MSGS)
    with torch.inference_mode():
        p = torch.softmax(llama.base(torch.tensor([ids])).logits[0, -1].double() / T, -1)
    vocab = llama.tokenizer
    counts = Counter(vocab.encode(c.text, add_special_tokens=False)[0] if c.text else None for c in r.choices)
    for tid in torch.topk(p, 5).indices.tolist():
        text = vocab.decode([tid])
        if vocab.encode(text, add_special_tokens=False) != [tid]:
            continue  # tokens that do not round-trip cannot be counted from text
        expected, sd = n * float(p[tid]), math.sqrt(n * float(p[tid]) * (1 - float(p[tid])))
        assert abs(counts[tid] - expected) <= 4 * sd + 1, (tid, counts[tid], expected)


def test_top_p_keeps_only_the_nucleus(llama):
    ids = llama.prompt_ids(MSGS)
    with torch.inference_mode():
        p = torch.softmax(llama.base(torch.tensor([ids])).logits[0, -1].double(), -1)
    sp, idx = torch.sort(p, descending=True)
    k = int((torch.cumsum(sp, 0) < 0.05).sum()) + 1  # smallest prefix reaching 5 %
    nucleus = {llama.tokenizer.decode([int(i)]) for i in idx[:k]}
    r = chat(llama, n=200, temperature=1.0, top_p=0.05, max_tokens=1, ignore_eos=True)
    assert {c.text for c in r.choices} <= nucleus | {""}


def test_bad_requests_are_input_errors(llama):
    with pytest.raises(EngineInputError):
        chat(llama, max_tokens=10_000_000)
    with pytest.raises(EngineInputError) as e:
        run(llama.chat(ChatRequest(messages=MSGS, adapter="nope")))
    assert e.value.status == 404
    with pytest.raises(EngineInputError):
        run(llama.load_adapter("x", "/nonexistent"))


# ------------------------------------------------------------------------- batched CPU decode
def _requests(engine):
    """Chat requests of different prompts, n, seeds, lengths and stop rules (what a stage sends at once)."""
    cat = default_catalog().scenarios
    msgs = [tuple(build_messages(cat[sid])) for sid in ("IR_prison", "biz_staghunt", "team_snowdrift", "pgg")]
    P = SamplingParams
    return [
        ChatRequest(messages=msgs[0], params=P(n=4, temperature=0.8, max_tokens=12, seed=3)),
        ChatRequest(messages=msgs[1], params=P(n=7, temperature=1.0, max_tokens=9, seed=4, stop=("a", "e"))),
        ChatRequest(messages=msgs[2], params=P(n=1, temperature=0.0, max_tokens=5, seed=5)),
        ChatRequest(messages=msgs[3], params=P(n=5, temperature=1.2, max_tokens=14, seed=6, logprobs=True,
                                               top_logprobs=2)),
        ChatRequest(messages=MSGS, params=P(n=9, temperature=0.8, max_tokens=7, seed=7, stop_at_answer="choice")),
        ChatRequest(messages=msgs[0], params=P(n=3, temperature=0.8, max_tokens=12, seed=3)),  # a prefix of the 1st
    ]


def _same(a, b) -> bool:
    return [(c.text, c.finish_reason, c.num_tokens, c.logprobs) for c in a.choices] == \
        [(c.text, c.finish_reason, c.num_tokens, c.logprobs) for c in b.choices]


def test_batched_requests_equal_each_request_alone(engine):
    """On the CPU the engine decodes every pending request in one step (`cpu_batch`); a request's samples are the
    ones it gets alone, whatever it is batched with (bitwise: fixed tiles for the token-wise ops)."""
    reqs = _requests(engine)
    alone = [run(engine.chat(r)) for r in reqs]

    async def together():
        return await asyncio.gather(*[engine.chat(r) for r in reqs])

    batched = run(together())
    assert all(_same(a, b) for a, b in zip(alone, batched))
    assert max(b.timings["batched_groups"] for b in batched) > 1  # they really shared steps
    assert [c.text for c in batched[5].choices] == [c.text for c in batched[0].choices][:3]  # u[i, t] per sample
    # reversed order, and a chunked request (max_batch_size rows per group) beside them: the same again
    old = engine.max_batch_size
    engine.max_batch_size = 3
    try:
        chunked = run(_gather(engine, list(reversed(reqs))))[::-1]
    finally:
        engine.max_batch_size = old
    assert all(_same(a, b) for a, b in zip(alone, chunked))
    assert chunked[1].timings["rows_per_chunk"] == 3


async def _gather(engine, reqs):
    return await asyncio.gather(*[engine.chat(r) for r in reqs])


def test_tiled_step_logits_do_not_depend_on_the_batch(engine):
    """The same group's next-token logits, alone and at another offset of a bigger batch: bitwise equal."""
    from tomtransfer.services.teacher.engines.cpu_batch import TiledStep

    if not isinstance(engine.decoder, SharedPrefixDecoder):
        pytest.skip("shared-prefix decoder only")
    ids = engine.prompt(MSGS)[0]
    dec = engine.decoder
    with torch.inference_mode():
        pre = engine._prefill(ids, 0, None)
        other = engine._prefill(ids[:-3], 0, None)
        step = TiledStep(dec, tile=8)
        feed = torch.tensor([5, 9, 11])
        a = dec.start(pre, 3, 4)
        alone = [step.step([a], [feed])[0] for _ in range(3)]
        fillers = [dec.start(other, 5, 4) for _ in range(3)]
        b = dec.start(pre, 3, 4)
        batched = [step.step([*fillers, b], [torch.arange(5)] * 3 + [feed])[-1] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(alone, batched))


def test_a_bad_request_fails_alone_in_a_batch(llama):
    good = ChatRequest(messages=MSGS, params=SamplingParams(n=3, max_tokens=6, seed=1))
    bad = ChatRequest(messages=MSGS, params=SamplingParams(n=2, max_tokens=10_000_000, seed=1))

    async def both():
        return await asyncio.gather(llama.chat(good), llama.chat(bad), return_exceptions=True)

    ok, err = run(both())
    assert isinstance(err, EngineInputError) and len(ok.choices) == 3
    assert _same(ok, run(llama.chat(good)))


def test_bf16_body_with_fp32_head(tmp_path):
    """`dtype: bfloat16` on the CPU: bf16 weights, fp32 logits (the LM head kept in fp32); batching and the prefix
    cache stay exact."""
    path = tiny_model_dir("qwen2", seed=3)
    e = TransformersEngine(ModelSpec(model=str(path), device="cpu", dtype="bfloat16"))
    try:
        assert e.dtype == torch.bfloat16 and e._head_w is not None and e._head_w.dtype == torch.float32
        reqs = _requests(e)
        alone = [run(e.chat(r)) for r in reqs]
        assert all(_same(a, b) for a, b in zip(alone, run(_gather(e, reqs))))
        x = run(e.exact(ExactRequest(messages=MSGS, temperature=1.0)))
        e.prefixes.clear()
        assert run(e.exact(ExactRequest(messages=MSGS, temperature=1.0))).p == x.p
        assert x.valid_mass + x.invalid_mass + x.unresolved_mass == pytest.approx(1.0, abs=1e-6)
    finally:
        run(e.close())


# ---------------------------------------------------------------------------------------- adapters
def test_adapters_change_and_restore(llama, tmp_path):
    req = ExactRequest(messages=MSGS, temperature=1.0)
    base = run(llama.exact(req))
    base_chat = chat(llama, n=10, seed=5)
    run(llama.load_adapter("one", make_lora(llama, tmp_path / "one", seed=1, scale=3.0)))
    run(llama.load_adapter("two", make_lora(llama, tmp_path / "two", seed=2, scale=3.0)))
    assert llama.models() == ["one", "two"]
    one = run(llama.exact(ExactRequest(messages=MSGS, temperature=1.0, adapter="one")))
    two = run(llama.exact(ExactRequest(messages=MSGS, temperature=1.0, adapter="two")))
    again = run(llama.exact(req))  # base while adapters are loaded: disable_adapter()
    assert one.top_tokens != base.top_tokens and two.top_tokens != one.top_tokens
    assert abs(one.top_tokens[0]["p"] - base.top_tokens[0]["p"]) > 1e-3
    assert again.p == pytest.approx(base.p, abs=1e-9) and again.top_tokens == base.top_tokens
    adapted = run(llama.chat(ChatRequest(messages=MSGS, params=SamplingParams(n=10, max_tokens=8, seed=5),
                                         adapter="one")))
    assert [c.text for c in adapted.choices] != [c.text for c in base_chat.choices]
    run(llama.unload_adapter("one"))
    run(llama.unload_adapter("two"))
    assert llama.models() == []
    after = run(llama.exact(req))
    assert after.p == pytest.approx(base.p, abs=1e-9) and after.top_tokens == base.top_tokens
    assert [c.text for c in chat(llama, n=10, seed=5).choices] == [c.text for c in base_chat.choices]
    with pytest.raises(EngineInputError):
        run(llama.unload_adapter("one"))


# ------------------------------------------------------------------------------------------- exact
def test_exact_masses_add_up_and_pgg(engine):
    s = default_catalog().scenarios["IR_prison"]
    r = run(engine.exact(ExactRequest(messages=tuple(build_messages(s)), temperature=0.8)))
    assert r.valid_mass + r.invalid_mass + r.unresolved_mass == pytest.approx(1.0, abs=1e-6)
    assert r.valid_mass == pytest.approx(r.p["C"] + r.p["D"])
    pgg = default_catalog().scenarios["pgg"]
    r = run(engine.exact(ExactRequest(messages=tuple(build_messages(pgg)), temperature=0.8, kind="contribution",
                                      endowment=10)))
    assert set(r.p) == {str(i) for i in range(11)}
    assert r.valid_mass + r.invalid_mass + r.unresolved_mass == pytest.approx(1.0, abs=1e-6)
    d = r.to_dict()
    assert "contributions" in d and d["mean_given_valid"] is None or 0 <= d["mean_given_valid"] <= 10
    greedy = run(engine.exact(ExactRequest(messages=tuple(build_messages(s)), temperature=0.0)))
    assert greedy.unresolved_mass < 1e-9 and (greedy.valid_mass in (0.0, 1.0) or greedy.valid_mass == pytest.approx(1))


def _biased_model(tmp_path, kind: str):
    """A tiny llama whose lm_head rows for answer-ish tokens are pushed along the mean direction of its final
    hidden states, so the answer mass is large and answers span several tokens ('C' + ' C'/'**'/'.',
    '1' + '0', '$' + '5', ...): exact and sampling are compared where it matters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir("llama", seed=5)
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src))
    text = tok.apply_chat_template(list(MSGS), add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        h = model.model(tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]).last_hidden_state[0]
    direction = h.mean(0) / h.mean(0).norm()
    pieces = ["C", "D", " C", "**", ".", " because"] if kind == "choice" else ["1", "0", "5", "$", " ", "3", "."]
    ids = sorted({i for p in pieces for i in tok.encode(p, add_special_tokens=False)})
    with torch.no_grad():
        model.lm_head.weight[ids] += 5.0 * direction
    out = tmp_path / f"biased-{kind}"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["choice", "contribution"])
def test_exact_matches_constrained_sampling(tmp_path, kind):
    """P(answer) from exact mode vs the frequency over 3000 samples that stop once their answer is decided:
    within 3 standard errors (+ the unresolved mass) for every answer with p > 1 %."""
    path = _biased_model(tmp_path, kind)
    e = TransformersEngine(ModelSpec(model=str(path), device="cpu", max_batch_size=4096))
    try:
        T, n = 1.0, 3000
        x = run(e.exact(ExactRequest(messages=MSGS, temperature=T, kind=kind, endowment=10)))
        assert x.valid_mass > 0.15, x.to_dict()
        r = run(e.chat(ChatRequest(messages=MSGS, params=SamplingParams(
            n=n, temperature=T, max_tokens=24, seed=123, stop_at_answer=kind, endowment=10))))
        lead = (lambda t: lead_choice(t)) if kind == "choice" else (lambda t: lead_contribution(t, 10))
        freq = Counter(lead(c.text) for c in r.choices)
        for a, p in x.p.items():
            if p < 0.01:
                continue
            se = math.sqrt(p * (1 - p) / n)
            assert abs(freq[a] / n - p) <= 3 * se + x.unresolved_mass, (a, freq[a] / n, p, se)
        valid = sum(v for k, v in freq.items() if k is not None) / n
        assert abs(valid - x.valid_mass) <= 3 * math.sqrt(x.valid_mass * (1 - x.valid_mass) / n) + x.unresolved_mass
    finally:
        run(e.close())


def test_an_idle_cpu_engine_gives_a_batch_memory_back(llama, monkeypatch):
    """After a batch, with nothing queued, the engine collects the batch's reference cycles and trims the heap (an
    idle teacher replica held ~0.25 GiB of dead KV through the demo's trainings); a finished job keeps no groups."""
    import time

    import tomtransfer.services.teacher.engines.transformers_engine as te

    calls = []
    monkeypatch.setattr(te.gc, "collect", lambda *a: calls.append("gc") or 0)
    res = run(llama.chat(ChatRequest(messages=MSGS, params=SamplingParams(n=3, max_tokens=4, seed=1))))
    assert len(res.choices) == 3
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:  # the engine thread finishes its drain after delivering
        time.sleep(0.05)
    assert calls == ["gc"]
    assert te._LIBC is not None  # glibc here: malloc_trim is called too
