"""How fast this host is right now: one single-thread LoRA step on SmolLM2-135M-Instruct (batch 2 x 450 tokens,
forward + backward + AdamW), fp32 and bf16, best of 3 after a warm-up. The machine is shared with other tenants and
its speed moves by 3x within an hour (benchmarks/results/suite_xdist/host_speed_2026-12-06.txt): run this before and
after a timing you will compare with another one.

Run: `.venv/bin/python -m benchmarks.host_speed` (needs `make models`); prints one JSON line.
"""

from __future__ import annotations

import json
import time

import torch


def step_seconds(path, dtype: torch.dtype) -> float:
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (2, 450), generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    times = []
    for _ in range(4):
        t = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def main() -> None:
    from tomtransfer.services.trainer.train import resolve_student

    torch.set_num_threads(1)
    path = resolve_student("smollm2-135m-instruct")
    print(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "fp32_step_s": round(step_seconds(path, torch.float32), 2),
                      "bf16_step_s": round(step_seconds(path, torch.bfloat16), 2)}))


if __name__ == "__main__":
    main()
