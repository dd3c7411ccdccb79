"""How much of the GPU protocol's training compute goes to padding, and what grouping by length would save.

The protocol run (configs/gpu.yaml, bench_protocol_gpu.py) trains on 20 in-sample scenarios x 300 motivated teacher
samples; the random-weight teacher writes its full 200 tokens every time, so the examples differ only in their
prompt. This rebuilds those examples' lengths with the trainer's own encoding (`encode_example`, the stand-in
tokenizer, a 200-token response) and pads micro-batches of 16 to their longest (a multiple of 8, as the trainer
does on a GPU): in the sampler's shuffled order, and grouped by length (sorted inside windows of 64 micro-batches,
as HF's `group_by_length` does). CPU only, a few seconds.

    python -m benchmarks.padding_protocol            # writes benchmarks/results/padding_protocol.json
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "results" / "padding_protocol.json"
SAMPLES, RESPONSE_TOKENS, MICRO_BATCH, PAD_MULTIPLE, EPOCHS = 300, 200, 16, 8, 3


def example_lengths() -> list[int]:
    from transformers import AutoTokenizer

    from tomtransfer.services.trainer.train import encode_example
    from tomtransfer.shared.prompts import build_messages
    from tomtransfer.shared.scenarios import default_catalog
    from tests.fixtures.synthetic_samples import bench_student_dir

    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(bench_student_dir(tmp))
    response = tok.decode(list(range(1000, 1000 + RESPONSE_TOKENS)))
    scenarios = [s for s in default_catalog().scenarios.values() if s.family == "in_sample"]
    per_scenario = [len(encode_example(tok, build_messages(s, "answer_motivation"), response, 1024)["input_ids"])
                    for s in scenarios]
    return [n for n in per_scenario for _ in range(SAMPLES)]


def padding_share(lengths: list[int], order: list[int]) -> float:
    real = padded = 0
    for i in range(0, len(order), MICRO_BATCH):
        batch = [lengths[j] for j in order[i : i + MICRO_BATCH]]
        real += sum(batch)
        padded += -(-max(batch) // PAD_MULTIPLE) * PAD_MULTIPLE * len(batch)
    return 1 - real / padded


def main() -> None:
    lengths = example_lengths()
    rng = random.Random(0)
    shuffled, grouped = [], []
    window = 64 * MICRO_BATCH
    for _ in range(EPOCHS):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        shuffled.append(padding_share(lengths, order))
        by_length = [j for w in range(0, len(order), window)
                     for j in sorted(order[w : w + window], key=lengths.__getitem__)]
        grouped.append(padding_share(lengths, by_length))
    result = {"examples": len(lengths), "len_min": min(lengths), "len_max": max(lengths),
              "micro_batch": MICRO_BATCH, "pad_multiple": PAD_MULTIPLE, "epochs": EPOCHS,
              "padding_share_shuffled": statistics.mean(shuffled), "padding_share_grouped": statistics.mean(grouped)}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
