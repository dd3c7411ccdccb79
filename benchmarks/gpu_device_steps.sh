#!/usr/bin/env bash
# The device-tool calls that produced benchmarks/results/gpu_ray_train_fixed.json, gpu_protocol*.{json,log,md},
# gpu_ray_train_fault_rerun.json and gpu_serving_direct_refactor.json (2026-11-30, nvidia-h200-x2), one function per
# call, in order, each within the 30 s warm window of the last. Each call carries the paths named beside it.
# Not run by anything here: the device tool runs a command line; paste a function's body (RESULTS.md, "Reproduce").
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
  mkdir -p /tmp/repo && cp -r services shared benchmarks configs tests scripts pyproject.toml /tmp/repo/
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
