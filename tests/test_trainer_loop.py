"""The per-worker training loop run plainly (no Ray, world size 1), as the GPU benchmark runs it.

- an interrupted run resumed from its checkpoint ends with bit-identical adapter weights;
- gradient accumulation gives the exact token mean over the effective batch (4 x 4 == 16 x 1);
- the adapter it writes loads with PeftModel.from_pretrained and reproduces the saved probe logits;
- Qwen2-architecture students train too (q/k/v biases);
- training.dtype bfloat16 on CPU: a bf16 base, fp32 adapters, its probe logits reproduced by a bf16 reload.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

SCENARIOS = ["IR_prison", "biz_staghunt", "team_snowdrift", "environment_delight"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tomtransfer.services.trainer.dataset import export_training_set
    from tests.fixtures.synthetic_samples import fake_samples

    samples = fake_samples(SCENARIOS, n=8, c_rate=0.9, invalid_rate=0.0, seed=5)
    return export_training_set(samples, tmp_path_factory.mktemp("ds"), targets="answer").parquet


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.fixtures.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=1)


def _config(data, student, out, **over):
    cfg = {"dataset_path": str(data), "student_path": str(student), "num_threads": 1, "output_dir": str(out),
           "training": {"epochs": 3, "effective_batch_size": 16, "per_device_batch_size": 4,
                        "learning_rate": 3e-2}}
    for k, v in over.items():
        if k == "training":
            cfg["training"] = {**cfg["training"], **v}
        else:
            cfg[k] = v
    return cfg


def test_resume_is_exact(data, llama, tmp_path):
    from tomtransfer.services.trainer.train import train_loop_per_worker

    full = train_loop_per_worker(_config(data, llama, tmp_path / "full", probe_examples=0))
    with pytest.raises(RuntimeError, match="injected fault at step 3"):
        train_loop_per_worker(_config(data, llama, tmp_path / "cut", probe_examples=0,
                                      checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_steps=1,
                                      fault={"at_step": 3, "rank": 0, "marker": str(tmp_path / "fired")}))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    resumed = train_loop_per_worker(_config(data, llama, tmp_path / "cut", probe_examples=0,
                                            resume_from=str(tmp_path / "ckpt")))
    assert resumed["start_step"] == 3 and resumed["step"] == full["step"] == 6
    assert resumed["adapter_checksums"] == full["adapter_checksums"]
    assert resumed["loss"] == full["loss"]


def test_grad_accumulation_is_an_exact_token_mean(data, llama, tmp_path):
    from tomtransfer.services.trainer.train import train_loop_per_worker

    accum = train_loop_per_worker(_config(data, llama, tmp_path / "a", probe_examples=0,
                                          training={"per_device_batch_size": 4, "epochs": 1}))
    whole = train_loop_per_worker(_config(data, llama, tmp_path / "b", probe_examples=0,
                                          training={"per_device_batch_size": 16, "epochs": 1}))
    assert accum["step"] == whole["step"] == 2
    assert accum["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    a = _adapter(tmp_path / "a" / "adapter")
    b = _adapter(tmp_path / "b" / "adapter")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_adapter_reload_reproduces_logits(arch, data, llama, tmp_path_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.fixtures.tiny_models import build_tiny_model
    from tomtransfer.services.trainer.train import train_loop_per_worker

    student = llama if arch == "llama" else build_tiny_model(tmp_path_factory.mktemp("q") / "qwen2", arch="qwen2")
    r = train_loop_per_worker(_config(data, student, tmp_path, training={"epochs": 1}))
    assert r["loss_last"] < r["loss_first"]
    probe = torch.load(tmp_path / "probe.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), str(tmp_path / "adapter"))
    with torch.no_grad():
        logits = model.eval()(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    mask = probe["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], probe["logits"][mask], rtol=1e-5, atol=1e-5)
    assert (tmp_path / "adapter" / "tomtransfer_training.json").is_file()


def test_cli_builds_the_training_set_from_samples(tmp_path):
    from tests.fixtures.synthetic_samples import fake_samples
    from tomtransfer.services.pipeline.stages import training_set as training_set_path
    from tomtransfer.shared.config import parse_config
    from tomtransfer.shared.errors import UserError

    cfg = parse_config({"name": "cli", "output_dir": str(tmp_path), "generate": {"targets": "answer"},
                        "models": {"teacher": {"model": "t"}, "student": {"model": "s"}}})
    with pytest.raises(UserError, match="tomtransfer generate"):
        training_set_path(cfg)
    from tomtransfer.services.collector.generate import generate_dir

    samples_dir = generate_dir(cfg) / "samples"
    samples_dir.mkdir(parents=True)
    fake_samples(SCENARIOS[:2], n=4, invalid_rate=0.0).to_parquet(samples_dir / "samples.parquet")
    path = training_set_path(cfg)
    assert path == generate_dir(cfg) / "dataset" / "train.parquet" and path.is_file()
    assert set(pd.read_parquet(path).target) <= {"C", "D"}  # generate.targets = answer


def test_preflight_refuses_a_student_without_chat_template(data, llama, tmp_path):
    from tomtransfer.services.trainer.train import TrainError, preflight
    from tomtransfer.shared.errors import UserError

    assert preflight(data, llama, 1024)["examples"] == 32
    with pytest.raises(UserError, match="max_seq_len"):
        preflight(data, llama, 64)
    bare = tmp_path / "bare"
    shutil.copytree(llama, bare)
    cfg = bare / "tokenizer_config.json"
    conf = json.loads(cfg.read_text())
    conf.pop("chat_template", None)
    cfg.write_text(json.dumps(conf))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(TrainError, match="chat template"):
        preflight(data, bare, 1024)


def test_gradient_checkpointing_trains_the_same_adapter(data, llama, tmp_path):
    """Recomputing activations (the demo's memory saver) must not change what is learned."""
    from tomtransfer.services.trainer.train import train_loop_per_worker

    plain = train_loop_per_worker(_config(data, llama, tmp_path / "plain", training={"epochs": 1}))
    ckpt = train_loop_per_worker(_config(data, llama, tmp_path / "ckpt", training={"epochs": 1},
                                         gradient_checkpointing=True))
    assert ckpt["loss_last"] == pytest.approx(plain["loss_last"], rel=1e-4, abs=1e-5)
    assert ckpt["loss_first"] == pytest.approx(plain["loss_first"], rel=1e-4, abs=1e-5)


def test_bf16_on_cpu_trains_a_bf16_base_with_fp32_adapters(data, llama, tmp_path):
    """training.dtype bfloat16 on CPU: the GPU's recipe (frozen bf16 base, fp32 LoRA weights, bf16 autocast); the
    loss falls like fp32's, and the saved adapter is fp32 and loads back."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tomtransfer.services.trainer.train import train_loop_per_worker

    fp32 = train_loop_per_worker(_config(data, llama, tmp_path / "fp32", training={"epochs": 2}))
    bf16 = train_loop_per_worker(_config(data, llama, tmp_path / "bf16", training={"epochs": 2, "dtype": "bfloat16"}))
    assert bf16["loss_last"] < bf16["loss_first"]
    # the same data, the same init: the first loss agrees to bf16's precision, then the runs drift apart slightly
    assert bf16["loss_first"] == pytest.approx(fp32["loss_first"], rel=2e-2)
    assert bf16["loss_first"] != fp32["loss_first"]  # bf16 really ran
    weights = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    # the probe logits were computed in bf16: a bf16 base with the reloaded adapter under autocast gives them back
    probe = torch.load(tmp_path / "bf16" / "probe.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16),
                                      str(tmp_path / "bf16" / "adapter")).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
    mask = probe["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], probe["logits"][mask], rtol=1e-5, atol=1e-5)
