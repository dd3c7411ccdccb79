"""An exact-mode call through the CUDA fast path's code, on CPU: the pooled graph buffers, the packed prompt, and each
graph replay run as the static forward it captures (no GPU here). Pins what the call costs in the decoder: ONE
prompt forward and one decode step per expansion level (no hidden extra forwards), no host syncs inside the
decoder, and a constant number of copy kernels when the expansion starts and moves its rows - not two per layer,
which is what the CUDA fast-path move's per-layer buffers cost (~200 kernel launches from Python per call for a
32-layer model: benchmarks/RESULTS.md, GPU section).
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from tomtransfer.services.teacher.engines.base import ExactRequest
from tomtransfer.services.teacher.engines.cuda_fastpath import CudaGraphDecoder, _PackedPrefix
from tomtransfer.services.teacher.engines.decoding import DecodingOptions
from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine
from tests.fixtures.tiny_models import tiny_model_dir, train_tokenizer

# ops that wait for the device on CUDA (a tensor's value read on the host)
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.is_nonzero.default"}
MOVE_OPS = {"aten.copy_.default", "aten.index_select.default", "aten.index_copy_.default", "aten.index_copy.default"}


class EagerReplay(CudaGraphDecoder):
    """`CudaGraphDecoder` with its graph path on (pooled static buffers, the packed prompt-forward buffers) and each
    replay running the static forward that the graph captures, eagerly."""

    def __init__(self, model):
        super().__init__(model, DecodingOptions(prompt_bucket=16, span_bucket=4), fuse=True)
        self.graphs = True
        self.calls = Counter()

    def _replay_prefill(self, pg):
        self.calls["prompt_forwards"] += 1
        pg.out = self._prefill_static(pg)
        return pg.out

    def _replay_step(self, state, span):
        self.calls["decode_steps"] += 1
        g = state.graph
        return self._forward(state, g.tokens, g.t, static=True, span=span)


class OpCounter(TorchDispatchMode):
    def __init__(self, counts: Counter, where: str):
        super().__init__()
        self.counts, self.where = counts, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNC_OPS:
            self.counts["syncs"] += 1
        if name in MOVE_OPS:
            self.counts[f"{self.where}_moves"] += 1
        return func(*args, **(kwargs or {}))


def counted(dec: EagerReplay, counts: Counter) -> None:
    """Count the sync and copy ops that the decoder's own entry points dispatch (not the expansion's)."""
    for name, where in (("start", "start"), ("select", "select")):
        fn = getattr(dec, name)

        def wrapped(*a, _fn=fn, _where=where, **k):
            counts[f"{_where}_calls"] += 1
            with OpCounter(counts, _where):
                return _fn(*a, **k)

        setattr(dec, name, wrapped)
    for name in ("prefill", "step"):
        fn = getattr(dec, name)

        def wrapped(*a, _fn=fn, **k):
            with OpCounter(counts, "other"):
                return _fn(*a, **k)

        setattr(dec, name, wrapped)


def engine(layers: int):
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama", seed=3, layers=layers))).eval()
    spec = SimpleNamespace(model="tiny", engine="transformers", device="cpu", dtype="float32", max_batch_size=8,
                           num_cpus=1.0)
    return TransformersEngine(spec, model=model, tokenizer=train_tokenizer())


def exact_call(eng, dec=None):
    if dec is not None:
        eng.decoder, eng.graphs = dec, True
        if getattr(eng, "_tiled", None) is not None:  # a CPU-only batched step bound to the engine's own decoder
            eng._tiled = None
    ids = list(range(10, 60))
    return eng.exact_ids(ids, ExactRequest(messages=(), temperature=0.8))


@pytest.fixture(scope="module")
def tokenizer_warm():
    train_tokenizer()  # cached build before the timed-free assertions


def run_counted(layers: int):
    eng = engine(layers)
    want = exact_call(eng)  # the plain CPU decoder
    dec = EagerReplay(eng.model)
    counts = Counter()
    counted(dec, counts)
    got = exact_call(eng, dec)
    return want, got, dec.calls, counts


def test_exact_call_on_the_graph_path_matches_and_costs_one_forward_per_level(tokenizer_warm):
    for layers in (2, 4):
        want, got, calls, counts = run_counted(layers)
        # the same distribution through the graph path's buffers (bucketed, padded, packed, rows moved by select)
        assert got.forward_passes == want.forward_passes >= 3  # prompt + at least two expansion levels
        for a in want.p:
            assert got.p[a] == pytest.approx(want.p[a], rel=1e-4, abs=1e-9)
        assert got.invalid_mass == pytest.approx(want.invalid_mass, rel=1e-4, abs=1e-9)
        assert got.unresolved_mass == pytest.approx(want.unresolved_mass, rel=1e-4, abs=1e-9)
        # one prompt forward and one decode step per expansion level, nothing hidden
        assert calls == Counter(prompt_forwards=1, decode_steps=got.forward_passes - 1)
        # no host syncs inside the decoder: the expansion's own reads of the logits are the call's only ones
        assert counts["syncs"] == 0
        # the expansion starts once and moves its rows once per further level
        assert counts["start_calls"] == 1 and counts["select_calls"] == got.forward_passes - 2
        # start copies the packed prompt in and writes the prompt mask (2); a select does the same for a new shape
        # (2; nothing where the shape stays) and gathers + writes the suffix keys and values (2 + 2). The per-layer
        # buffers before cost 2 copies per layer for the prompt and 4 per layer for the rows.
        assert counts["start_moves"] == 2, counts
        assert 4 * counts["select_calls"] <= counts["select_moves"] <= 6 * counts["select_calls"], counts
        # (bounds without the number of layers in them: with 4 layers the per-layer buffers would make 8 and 16+)


def test_prompt_forward_returns_the_packed_buffers():
    eng = engine(2)
    dec = EagerReplay(eng.model)
    with torch.inference_mode():
        pre = dec.prefill(list(range(10, 47)))
    assert isinstance(pre, _PackedPrefix) and pre.packed.shape[:2] == (2, 2) and pre.packed.shape[3] == 48
    for i, (k, v) in enumerate(pre.kv):
        assert k.data_ptr() == pre.packed[0, i].data_ptr() and v.data_ptr() == pre.packed[1, i].data_ptr()
        assert k.shape[1] == 37
