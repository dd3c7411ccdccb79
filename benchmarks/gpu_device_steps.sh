#!/usr/bin/env bash
# The device-tool calls that produced benchmarks/results/gpu_ray_train_fixed.json, gpu_protocol*.{json,log,md},
# gpu_ray_train_fault_rerun.json and gpu_serving_direct_refactor.json (2026-11-30, nvidia-h200-x2), one function per
# call, in order, each within the 30 s warm window of the last. Each call carries the paths named beside it.
# Earlier calls: paste a function's body (RESULTS.md, "Reproduce"); from 2026-12-05 on the device ran
# `bash benchmarks/gpu_device_steps.sh <function>` (the dispatcher at the end).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

call1() {  # carry: build/gpu-wheels-p1 (ray part 1 + pydantic)
  mkdir -p /tmp/w && cp build/gpu-wheels-p1/* /tmp/w/
}

call2() {  # carry: build/gpu-wheels-p2 build/gpu-wheels (ray part 2 + ray[serve,train]'s wheels)
  cp build/gpu-wheels-p2/* build/gpu-wheels/* /tmp/w/
}

call3() {  # carry: build/gpu-wheels-mlflow build/gpu-ray; install, the 2-GPU rate, then start the protocol run
  (cd /tmp/w && cat ray.part.aa ray.part.ab > ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl && rm ray.part.*)
  cp build/gpu-wheels-mlflow/*.whl /tmp/w/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/w/*.whl
  mkdir -p /tmp/repo && cp -r tomtransfer services shared benchmarks configs tests scripts pyproject.toml /tmp/repo/
  cp -r build/gpu-ray /tmp/gpu-ray
  export PYTHONPATH=/tmp/site:/tmp/repo; cd /tmp/repo
  timeout 220 python3 -m benchmarks.bench_train_gpu_ray --data /tmp/gpu-ray --phases ray2 --out "$OUT/gpu_ray_train_fix.json"
  mkdir -p /tmp/proto
  setsid bash -c 'OUT=/tmp/proto python3 -m benchmarks.bench_protocol_gpu --data /tmp/gpu-ray --fresh; echo $? > /tmp/proto/rc' \
    > /tmp/proto/log 2>&1 < /dev/null &
  while [ $SECONDS -lt 575 ] && [ ! -f /tmp/proto/rc ]; do sleep 5; done
}

call4() {  # collect the protocol run
  while [ $SECONDS -lt 540 ] && [ ! -f /tmp/proto/rc ]; do sleep 5; done
  cp /tmp/proto/gpu_protocol.json /tmp/proto/log /tmp/gpu-protocol-runs/gpu/stages.json "$OUT/"
}

call5() {  # the engine after its refactor; checkpoint/resume/FailureConfig against the GPU's own noise
  export PYTHONPATH=/tmp/site:/tmp/repo; cd /tmp/repo
  cp /tmp/gpu-protocol-runs/gpu/evaluate/report/report.md "$OUT/"
  timeout 150 python3 -m benchmarks.bench_serving_gpu_ray --data /tmp/gpu-ray --phases direct \
    --out "$OUT/gpu_serving_direct_refactor.json"
  timeout 390 python3 -m benchmarks.bench_train_gpu_ray --data /tmp/gpu-ray --phases ref,resume,fault \
    --out "$OUT/gpu_ray_train_fault.json"
}

# ---------------------------------------------------------------------------------------------------------------
# 2026-12-05, one NVIDIA H100 80GB HBM3 (kind nvidia-h100-x1), issue 23 items 2 and 3. Asked for nvidia-h200: four
# starts failed ("no device machine could be started right now"), so all of it ran on one warm H100, baselines in the
# same calls. The 2-GPU protocol run and scaling past 2 GPUs were not possible: `status` listed kinds
# ["nvidia-h100-x1", "nvidia-h200"] only. Run as `bash benchmarks/gpu_device_steps.sh s6_callN` (the dispatcher at
# the end) or, for calls 3 and 4, the function's body as the command line; each call within the 30 s warm window of
# the last (raw output: benchmarks/results/gpu_exact_ab_h100.*, gpu_exact_profile_fix_h100.txt, gpu_vllm_h100.*).
# Prepared here first:
#   .venv/bin/python -m benchmarks.bench_serving_gpu --prepare .bench/serving-gpu
#   .bench/old/{parent,move,head,fix}: `git archive` of services, shared, tests/fixtures and the two benchmark
#     scripts at 217188b^ (before the CUDA fast-path move), 217188b (the move), HEAD, and HEAD + the
#     packed-buffer cuda_fastpath.py (the fix)
#   .whl: vllm 0.26.0 (the newest release whose torch pin is torch==2.11.0; 0.27.0-0.31.0 pin torch==2.13.0), from
#     `pip download --no-deps`, unpacked without the FA2 kernels (291 MB; FA3 serves Hopper), the MoE kernels
#     (45 MB), vllm-rs and the DeepGEMM/SM100 third-party kernels, as an xz tar (73.6 MB) split in two; plus the
#     wheels of its dependencies the device image lacks (pydantic, fastapi, openai, pyzmq, msgspec, xgrammar 0.2.7,
#     apache-tvm-ffi 0.1.10, mistral_common, ...; 48 MB; xgrammar 0.2.8+ need apache-tvm-ffi >= 0.1.11, which vllm pins
#     at 0.1.10; the list was checked by importing vLLM's engine, worker, model runner, sampler and attention modules
#     here with only the device image's packages + these on the path). .whl/p1 = the first 49 MiB of the xz + 8 MiB of
#     wheels, .whl/p2 = the rest of the xz (21 MiB) + 38 MiB of wheels: each call under the 64 MiB carry limit with
#     the working tree (2.5 MiB) and, in call 1, .bench/old (3.2 MiB). Not carried: flashinfer, tilelang,
#     nvidia-cutlass-dsl, quack-kernels, humming-kernels, tokenspeed-mla, torchcodec, PyNvVideoCodec (optional GPU
#     kernels, imported only on paths this model does not take, except FlashInfer's sampler probe: see s6_call3).

s6_call1() {  # carry: .bench/serving-gpu .bench/old .whl/p1; the exact-call A/B on one warm machine (wall 185 s)
  mkdir -p /tmp/w && cp .whl/p1/* /tmp/w/  # vLLM part 1, kept on the machine for call 2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  local r=$PWD v only lim
  for v in head fix parent move; do
    only=engine,engine_compiled; lim=130
    [ $v = head ] && lim=150  # the first compile (cold Inductor cache)
    [ $v = move ] && { only=engine; lim=80; }
    (cd .bench/old/$v && timeout $lim python3 -m benchmarks.bench_serving_gpu --tokenizer "$r/.bench/serving-gpu" \
      --compile --only $only --skip-hf --repeats 5 --out "$OUT/serving_gpu_$v.json" >> "$OUT/call1.log" 2>&1)
    echo "$v rc=$? at ${SECONDS}s"
  done
  (cd .bench/old/fix && timeout 60 python3 -m benchmarks.profile_exact_gpu --tokenizer "$r/.bench/serving-gpu" \
    --calls 20 > "$OUT/profile_exact_fix.txt" 2>&1)
  grep -h '"seconds"' "$OUT/call1.log" | cut -c1-300
}

s6_call2() {  # carry: .bench/serving-gpu .whl/p2; vLLM installed from both parts, then vLLM vs the home-made engine
  # (as run: the transformers part passed; both vLLM parts failed at engine start - flashinfer, see s6_call3)
  [ -f /tmp/w/vllm.part.aa ] || { echo "a fresh machine: call 1's part is gone"; return 3; }
  cp .whl/p2/* /tmp/w/ && cat /tmp/w/vllm.part.* > /tmp/w/vllm.tar.xz && rm /tmp/w/vllm.part.*
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/w/*.whl
  python3 -c "import tarfile; tarfile.open('/tmp/w/vllm.tar.xz').extractall('/tmp/site')"
  echo "installed at ${SECONDS}s"
  export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  timeout 200 python3 -m benchmarks.bench_vllm_gpu --part transformers --tokenizer .bench/serving-gpu \
    --model-dir /tmp/m7b --out "$OUT/vllm_gpu_transformers.json" >> "$OUT/call2.log" 2>&1
  echo "transformers rc=$? at ${SECONDS}s"
  timeout $((560 - SECONDS)) python3 -m benchmarks.bench_vllm_gpu --part vllm --model-dir /tmp/m7b \
    --out "$OUT/vllm_gpu_vllm.json" >> "$OUT/call2.log" 2>&1
  local rc=$?
  echo "vllm rc=$rc at ${SECONDS}s"
  if [ $rc -ne 0 ] && [ $SECONDS -lt 420 ]; then  # once more without torch.compile / CUDA graphs
    timeout $((570 - SECONDS)) python3 -m benchmarks.bench_vllm_gpu --part vllm --eager --model-dir /tmp/m7b \
      --out "$OUT/vllm_gpu_vllm_eager.json" >> "$OUT/call2.log" 2>&1
    echo "vllm eager rc=$? at ${SECONDS}s"
  fi
  tail -c 9000 "$OUT/call2.log"
}

s6_call3() {  # carry: nothing; the vLLM part again, without vLLM's FlashInfer sampler probe (flashinfer not carried)
  test -d /tmp/site/vllm && test -d /tmp/m7b || { echo cold; exit 3; }; export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1; timeout 450 python3 -m benchmarks.bench_vllm_gpu --part vllm --model-dir /tmp/m7b --out $OUT/vllm_gpu_vllm.json > $OUT/call3.log 2>&1; echo "vllm rc=$? at ${SECONDS}s"; grep -v "^(EngineCore" $OUT/call3.log | tail -c 6000; grep -m5 -i "error\|Traceback" $OUT/call3.log | cut -c1-300
}

s6_call4() {  # carry: nothing; vLLM without LoRA and with max_logprobs 20 (its exact call is refused then: expected)
  test -d /tmp/site/vllm && test -d /tmp/m7b || { echo cold; exit 3; }; export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1; timeout 280 python3 -m benchmarks.bench_vllm_gpu --part vllm --model-dir /tmp/m7b --engine-kwargs '{"enable_lora": false, "max_logprobs": 20}' --repeats 3 --out $OUT/vllm_gpu_vllm_nolora.json > $OUT/call4.log 2>&1; echo "vllm rc=$? at ${SECONDS}s"; grep -E "^vllm|started" $OUT/call4.log | cut -c1-400; grep -m3 -i "Error" $OUT/call4.log | cut -c1-300
}

# ---------------------------------------------------------------------------------------------------------------
# 2026-12-05, issue 22 item 5: the teacher cost of the soft-label set vs the paper's 6000 samples, and one epoch of
# each training objective (benchmarks/bench_objectives_gpu.py; results/objectives_gpu_<card>.json, RESULTS.md
# "Objectives on the GPU"). One call on one GPU (the device tool's default kind), prepared here first with
#   .venv/bin/python -m benchmarks.bench_objectives_gpu --prepare .bench/objectives-gpu
# Not run yet: tried 16:53 and 16:58 UTC, "no device machine could be started right now" both times.

obj_call1() {  # carry: .bench/objectives-gpu; (a) 20 exact calls, (b) 20 x 300 x 64 samples, (c) distribution + sft. Ran 2026-12-05 on an H100 as: --deadline 170 --sft-steps 5 --dist-epochs 3 (timeout 215)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 340 python3 -m benchmarks.bench_objectives_gpu --data .bench/objectives-gpu --deadline 250 \
    --out "$OUT/objectives_gpu.json" > "$OUT/objectives_gpu.log" 2>&1
  echo "rc=$? at ${SECONDS}s"
  grep -v "^\[train\]" "$OUT/objectives_gpu.log" | cut -c1-600 | tail -c 8000
}

if [ $# -gt 0 ]; then "$@"; fi
