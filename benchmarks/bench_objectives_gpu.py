"""The teacher cost and the training cost of the two objectives (issue 22 item 5), on one GPU, Llama-2-7B shape.

Measured with the product's own code, no Ray, no MLflow (the device image has neither, nor pydantic):
(a) soft_labels   the teacher's part of the soft-label set: 20 exact-mode calls (`TransformersEngine.exact`, the
                  engine's tree expansion over full next-token distributions, T = 0.8), one per in-sample scenario,
                  all submitted at once (the engine thread runs them one after another): wall seconds and forward
                  passes (`ExactResult.forward_passes`, summed);
(b) samples       the paper's generate stage at N = 300: 20 scenarios x 300 samples x 64 new tokens (6000 motivated
                  samples, EOS ignored so every sample is 64 tokens, T = 0.8) through `TransformersEngine.chat`, the
                  20 requests submitted at once: wall seconds and generated tokens;
(c) one epoch of each objective with the trainer's per-worker loop (`services.trainer.train.train_loop_per_worker`,
                  run as one plain process, `random_init`), LoRA r=8 alpha=16 on q_proj/v_proj, the paper's batch
                  (4 per micro-batch, effective 64), bf16 base, fused AdamW:
                  - sft on the 6000 samples as a training set (answer + motivation targets, 64 tokens each);
                  - distribution on the 20-scenario soft-label set (`services.trainer.distill`: forward KL over the
                    action strings; one epoch = ceil(20 / 64) = 1 optimizer step).
                  Seconds per optimizer step = the loop's own per-step clock (`history[i].window_s`), median over
                  the steps after `--warm` warm-up steps; epoch = steps_per_epoch x that median. The distribution
                  run trains `--dist-epochs` epochs (1 step each) so that its step is timed warm, as the SFT one is.
                  SFT's epoch (94 steps) is EXTRAPOLATED from `--sft-steps` steps (the device budget holds no full
                  epoch); the JSON says `extrapolated: true` and from how many steps.

Inputs are prepared here (the scenario catalog needs pydantic), all on real scenario prompts of the 20 in-sample
scenarios (the `answer_motivation` instruction, ChatML): the tokenizer is the test fixtures' byte-level BPE trained on
the scenario texts with 4000 tokens (`bench_student_dir`, the one bench_train_gpu.py uses), which gives these prompts
418-438 tokens, the demo teacher Qwen2.5's 420-441; the 6000 training examples are `fake_samples` (300 per scenario,
C-rate 0.7, no invalid answers) with responses cut to 64 tokens; the soft-label set is `build_soft_labels` over those
samples (source "samples"; its content does not change the cost).

Limits
- Random weights: the timing of a 7B forward/backward does not depend on them, but exact mode's expansion depth does
  (how many tokens before an answer is decided): a real instruct teacher that leads with its letter needs 1-2 passes
  per call; here the count is whatever the random model's distribution gives (reported).
- The soft-label set's teacher cost is the exact calls only: where a teacher's answer does not lead, the product
  falls back on samples it already has from the generate stage (no extra teacher cost is counted for them).
- Eager training (no `compile`); the product's default.
- One GPU; the engine's model is freed before training, each training run builds its own 7B model (setup time is
  reported apart from the loop's time).

Steps:
  .venv/bin/python -m benchmarks.bench_objectives_gpu --prepare .bench/objectives-gpu          # here
  python3 -m benchmarks.bench_objectives_gpu --data .bench/objectives-gpu --out $OUT/objectives_gpu.json  # GPU
  .venv/bin/python -m benchmarks.bench_objectives_gpu --tiny --data .bench/objectives-gpu \\
      --out /tmp/objectives_tiny.json    # CPU smoke run of the same code (tiny model, < 2 min; ray, mlflow and
                                         # pydantic blocked, as on the device image)
(device tool: carry `.bench/objectives-gpu`). The JSON is rewritten after every part, so a run cut short by its time
limit still leaves the parts it finished; `--deadline` (seconds from start) skips parts that would not fit.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCENARIOS = 20
SAMPLES = 300  # the paper's N
NEW_TOKENS = 64
TEMPERATURE = 0.8
INSTRUCTION = "answer_motivation"
PER_DEVICE, EFFECTIVE = 4, 64  # configs/paper.yaml


# ------------------------------------------------------------------------------------------------ prepare (here)
def prepare(out: Path) -> None:
    """The inputs: student folders (7B config and a tiny one, same tokenizer), the 20 scenarios' prompts, the
    6000-example training set, the soft-label set and the loop's default knobs."""
    from transformers import AutoTokenizer

    from tomtransfer.services.trainer.dataset import export_training_set
    from tomtransfer.services.trainer.softlabels import build_soft_labels, export_soft_labels
    from tomtransfer.services.trainer.train import DEFAULT_TRAINING
    from tomtransfer.shared.prompts import build_messages
    from tomtransfer.shared.scenarios import build_catalog
    from tests.fixtures.synthetic_samples import bench_student_dir, fake_samples
    from tests.fixtures.tiny_models import tiny_config

    out.mkdir(parents=True, exist_ok=True)
    bench_student_dir(out / "student")  # Llama-2-7B config + the 4000-token ChatML tokenizer, no weights
    tok = AutoTokenizer.from_pretrained(out / "student")
    tiny = tiny_config("llama", len(tok))
    tiny.eos_token_id, tiny.pad_token_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    tok.save_pretrained(out / "student-tiny")
    tiny.save_pretrained(out / "student-tiny")

    scenarios = build_catalog().select(["in_sample"], None)
    assert len(scenarios) == SCENARIOS, len(scenarios)
    rows = [{"scenario_id": s.id, "messages": build_messages(s, INSTRUCTION),
             "kind": "contribution" if s.is_pgg else "choice",
             "endowment": int(s.game.endowment) if s.is_pgg else 10} for s in scenarios]
    (out / "scenarios.json").write_text(json.dumps(rows, indent=1))

    samples = fake_samples(families=["in_sample"], n=SAMPLES, invalid_rate=0.0, motivation_words=80, seed=3)
    samples["response"] = [tok.decode(tok(r, add_special_tokens=False)["input_ids"][:NEW_TOKENS])
                           for r in samples["response"]]
    ex = export_training_set(samples, out / "data", targets="answer_motivation")
    for extra in ("train_alpaca.json", "train_sharegpt.json"):  # LLaMA-Factory's copies: 28 MB the loop never reads
        (out / "data" / extra).unlink(missing_ok=True)
    df, dropped = build_soft_labels(scenarios, samples, None, instruction=INSTRUCTION, teacher_instruction=INSTRUCTION)
    soft = export_soft_labels(df, out / "soft", name="bench-soft-labels", teacher="fake-teacher",
                              instruction=INSTRUCTION, teacher_instruction=INSTRUCTION, dropped=dropped)
    (out / "training_defaults.json").write_text(json.dumps(DEFAULT_TRAINING))
    lens = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]) for r in rows]
    print(f"prepared {out}: {ex.examples} training examples, {soft.rows} soft labels, prompts {min(lens)}-{max(lens)} "
          f"tokens", flush=True)


# ------------------------------------------------------------------------------------------------ the run
class _Run:
    """The results dict, written to `--out` after every part; the clock against `--deadline`."""

    def __init__(self, args):
        self.args, self.t0, self.res = args, time.perf_counter(), {}

    def left(self) -> float:
        return self.args.deadline - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.res["elapsed_s"] = time.perf_counter() - self.t0
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.res, indent=1, default=str))


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def teacher_parts(run: _Run, data: Path, tiny: bool, samples: int, n_scenarios: int) -> None:
    """(a) 20 exact calls, (b) 20 x `samples` x 64 tokens, on one engine over one random-weight model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tomtransfer.services.teacher.engines.base import ChatRequest, ExactRequest, SamplingParams
    from tomtransfer.services.teacher.engines.decoding import DecodingOptions
    from tomtransfer.services.teacher.engines.transformers_engine import TransformersEngine

    student = data / ("student-tiny" if tiny else "student")
    dev = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    t = time.perf_counter()
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student), dtype=dtype,
                                                 attn_implementation="sdpa")
    model.eval()
    tok = AutoTokenizer.from_pretrained(student)
    # a ModelSpec's fields, without pydantic (as bench_serving_gpu.py)
    spec = SimpleNamespace(model="llama2-7b-random", engine="transformers", device=dev.type,
                           dtype="float32" if tiny else "bfloat16", max_batch_size=SAMPLES, num_cpus=1.0,
                           decoding=DecodingOptions())
    eng = TransformersEngine(spec, model=model, tokenizer=tok)
    eng._pool.submit(lambda: None).result()  # the vocabulary table, built off the request path
    run.res["engine"] = {"build_s": time.perf_counter() - t, "decoder": eng.decoder.name,
                         "params": sum(p.numel() for p in model.parameters())}
    scen = json.loads((data / "scenarios.json").read_text())[:n_scenarios]
    run.res["prompt_tokens"] = [len(eng.prompt_ids(s["messages"])) for s in scen]

    def exact_req(s):
        return ExactRequest(messages=tuple(s["messages"]), temperature=TEMPERATURE, kind=s["kind"],
                            endowment=s["endowment"])

    def chat_req(s, n, i):
        return ChatRequest(messages=tuple(s["messages"]), params=SamplingParams(
            n=n, temperature=TEMPERATURE, max_tokens=NEW_TOKENS, seed=1000 + i, ignore_eos=True))

    async def together(coros):
        return await asyncio.gather(*coros)

    # (a) the soft-label set's teacher calls
    t = time.perf_counter()
    asyncio.run(eng.exact(exact_req(scen[0])))  # warm-up (graph capture, allocator)
    warm_x = time.perf_counter() - t
    _sync(dev)
    t = time.perf_counter()
    xs = asyncio.run(together([eng.exact(exact_req(s)) for s in scen]))
    _sync(dev)
    wall_x = time.perf_counter() - t
    run.res["soft_labels"] = {
        "calls": len(xs), "seconds": wall_x, "warmup_call_s": warm_x, "per_call_s": wall_x / len(xs),
        "forward_passes": sum(x.forward_passes for x in xs),
        "forward_passes_per_call": [x.forward_passes for x in xs],
        "prompt_tokens": sum(x.prompt_tokens for x in xs),
        "valid_mass_mean": statistics.mean(x.valid_mass for x in xs),
        "unresolved_mass_mean": statistics.mean(x.unresolved_mass for x in xs)}
    print("soft_labels", json.dumps(run.res["soft_labels"]), flush=True)
    run.save()

    # (b) the paper's samples: 20 requests of `samples` each, submitted together
    t = time.perf_counter()
    asyncio.run(eng.chat(chat_req(scen[0], samples, 999)))  # warm-up at the same row count
    warm_s = time.perf_counter() - t
    _sync(dev)
    t = time.perf_counter()
    rs = asyncio.run(together([eng.chat(chat_req(s, samples, i)) for i, s in enumerate(scen)]))
    _sync(dev)
    wall_s = time.perf_counter() - t
    gen = sum(r.completion_tokens for r in rs)
    assert all(len(r.choices) == samples for r in rs)
    run.res["samples"] = {
        "requests": len(rs), "samples": samples * len(rs), "max_tokens": NEW_TOKENS, "ignore_eos": True,
        "seconds": wall_s, "warmup_request_s": warm_s, "generated_tokens": gen, "tokens_per_s": gen / wall_s,
        "prompt_tokens": sum(r.prompt_tokens for r in rs),
        "per_request_prefill_s": [r.timings.get("prefill_s") for r in rs],
        "per_request_decode_s": [r.timings.get("decode_s") for r in rs],
        "rows_per_chunk": rs[0].timings.get("rows_per_chunk")}
    print("samples", json.dumps({k: v for k, v in run.res["samples"].items() if not k.startswith("per_")}),
          flush=True)
    sx = run.res["soft_labels"]
    run.res["teacher_ratio"] = {"seconds_samples_over_soft_labels": wall_s / wall_x,
                                "tokens_generated_per_exact_forward_pass": gen / max(1, sx["forward_passes"])}
    run.save()
    asyncio.run(eng.close())
    del eng, model, xs, rs
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def train_part(run: _Run, data: Path, tiny: bool, objective: str, *, steps: int | None, epochs: float,
               warm: int) -> None:
    """(c) the loop on one objective; `steps` caps optimizer steps (SFT), `epochs` sets them otherwise."""
    import torch

    from tomtransfer.services.trainer.train import train_loop_per_worker

    config = {
        "dataset_path": str(data / "data" / "train.parquet"),
        "soft_labels_path": str(data / "soft" / "soft_labels.parquet"),
        "student_path": str(data / ("student-tiny" if tiny else "student")),
        "random_init": True, "use_gpu": not tiny, "seed": 0, "log_every_steps": 1, "probe_examples": 0,
        "output_dir": tempfile.mkdtemp(prefix="bench-objectives-"),
        "training": {**json.loads((data / "training_defaults.json").read_text()), "objective": objective,
                     "per_device_batch_size": PER_DEVICE, "effective_batch_size": EFFECTIVE, "epochs": epochs},
    }
    if steps:
        config["max_steps"] = steps
    if not tiny:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    r = train_loop_per_worker(config)
    wall = time.perf_counter() - t
    step_s = [h["window_s"] for h in r["history"]]
    timed = step_s[warm:] or step_s
    units = r["examples"]  # SFT examples, or soft labels (the distribution objective's unit is a scenario)
    grad_accum = math.ceil(EFFECTIVE / PER_DEVICE)
    steps_per_epoch = math.ceil(math.ceil(units / PER_DEVICE) / grad_accum)
    median = statistics.median(timed)
    part = {
        "objective": objective, "units": units, "per_device": PER_DEVICE, "effective_batch": EFFECTIVE,
        "steps_per_epoch": steps_per_epoch, "steps_run": len(step_s), "warmup_steps": warm,
        "step_s": step_s, "median_step_s": median, "epoch_s": steps_per_epoch * median,
        "extrapolated": len(step_s) < steps_per_epoch,
        "epoch_basis": (f"{steps_per_epoch} steps x the median of {len(timed)} timed steps after {warm} warm-up"
                        + (f" (EXTRAPOLATED: {len(step_s)} of {steps_per_epoch} steps run)"
                           if len(step_s) < steps_per_epoch else "")),
        "first_step_s": step_s[0], "loop_s": r["loop_s"], "setup_s": wall - r["loop_s"], "wall_s": wall,
        "loop_tokens": r["loop_tokens"], "tokens_per_s_avg": r["tokens_per_s_avg"],
        "loss_first": r["loss_first"], "loss_last": r["loss_last"],
        "trainable_params": r["trainable_params"], "total_params": r["total_params"]}
    if not tiny:
        part["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    run.res[objective] = part
    print(objective, json.dumps({k: v for k, v in part.items() if k != "step_s"}), flush=True)
    gc.collect()
    if not tiny:
        torch.cuda.empty_cache()


def _block_device_absent() -> None:
    """The smoke run imports nothing the device image lacks: `import ray` (mlflow, pydantic) raises ImportError and
    `importlib.util.find_spec` finds none of them (a None entry in sys.modules)."""
    for name in ("ray", "mlflow", "pydantic", "pydantic_core"):
        assert name not in sys.modules or sys.modules[name] is None, f"{name} already imported"
        sys.modules[name] = None  # type: ignore[assignment]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", type=Path, help="write the inputs to this folder (here: needs pydantic)")
    ap.add_argument("--data", type=Path, help="a folder written by --prepare")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny random model, fewer samples and steps")
    ap.add_argument("--samples", type=int, default=None, help=f"samples per scenario (default {SAMPLES}; tiny 4)")
    ap.add_argument("--scenarios", type=int, default=None, help=f"scenarios in (a), (b) (default {SCENARIOS}; tiny 4)")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps run (default 6; tiny 2)")
    ap.add_argument("--dist-epochs", type=int, default=None, help="distribution epochs run (default 5; tiny 2)")
    ap.add_argument("--warm", type=int, default=None, help="warm-up steps left out of the median (default 2; tiny 1)")
    ap.add_argument("--deadline", type=float, default=330.0, help="seconds from start: parts that would start "
                    "later than this minus their estimate are skipped (and said so)")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare)  # a process of its own: the run must not find pydantic already imported
    if args.tiny:
        _block_device_absent()
    tiny = args.tiny
    samples = args.samples or (4 if tiny else SAMPLES)
    n_scenarios = args.scenarios or (4 if tiny else SCENARIOS)
    sft_steps = args.sft_steps or (2 if tiny else 6)
    dist_epochs = args.dist_epochs or (2 if tiny else 5)
    warm = args.warm if args.warm is not None else (1 if tiny else 2)

    import torch

    if not tiny:
        assert torch.cuda.is_available(), "needs a GPU (or --tiny)"
    run = _Run(args)
    run.res.update({
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if not tiny else None, "tiny": tiny,
        "setup": {"scenarios": n_scenarios, "samples_per_scenario": samples, "new_tokens": NEW_TOKENS,
                  "temperature": TEMPERATURE, "instruction": INSTRUCTION, "lora": "r=8 alpha=16 q_proj,v_proj",
                  "per_device": PER_DEVICE, "effective_batch": EFFECTIVE, "sft_steps_run": sft_steps,
                  "dist_epochs_run": dist_epochs, "warmup_steps": warm, "deadline_s": args.deadline},
        "skipped": []})
    try:
        import transformers

        run.res["transformers"] = transformers.__version__
    except ImportError:
        pass
    run.save()
    teacher_parts(run, args.data, tiny, samples, n_scenarios)
    # the distribution epoch first: it is short; SFT's steps last, where a cut costs least
    for objective, kw, estimate in (("distribution", {"steps": None, "epochs": dist_epochs}, 45),
                                    ("sft", {"steps": sft_steps, "epochs": 3.0}, 60)):
        if not tiny and run.left() < estimate:
            run.res["skipped"].append(f"{objective}: {run.left():.0f} s left of the deadline, needs ~{estimate} s")
            run.save()
            continue
        try:
            train_part(run, args.data, tiny, objective, warm=warm, **kw)
        except Exception as e:  # noqa: BLE001 - keep what the other parts measured
            run.res[objective] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
            print(objective, "FAILED", run.res[objective]["error"], flush=True)
        run.save()
    s, d = run.res.get("sft", {}), run.res.get("distribution", {})
    if "epoch_s" in s and "epoch_s" in d:
        run.res["train_ratio"] = {"epoch_sft_over_distribution": s["epoch_s"] / d["epoch_s"],
                                  "step_sft_over_distribution": s["median_step_s"] / d["median_step_s"]}
    run.save()
    print("done", json.dumps({k: run.res.get(k) for k in ("teacher_ratio", "train_ratio", "skipped")}), flush=True)


if __name__ == "__main__":
    main()
