#!/usr/bin/env bash
# One check of fnlight on a CUDA machine, in under 8 minutes on one GPU:
#   1. the `gpu`-marked tests (CUDA-only: skipped on the CPU-only CI);
#   2. the step benchmark: the gpt workload on CUDA in float32 and in bf16-mixed (steps/s and peak memory
#      per variant), and the small/large MLP workloads (which run on the CPU, as in docs/benchmarks.md);
#   3. the data benchmark, and a pipeline ending in `to_device()` feeding the GPU (batches/s).
# Every result is written as JSON (the tests as JUnit XML and text) into one folder.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR]        (default: gpu_check/; PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
py=${PYTHON:-python}
mkdir -p "$out"
start=$SECONDS

"$py" - <<'EOF' | tee "$out/device.json"
import json, torch
assert torch.cuda.is_available(), "benchmarks/gpu_check.sh needs a CUDA device"
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}))
EOF

step() {  # a timed section: its name, its time limit in seconds, then the command
  local name=$1 limit=$2
  shift 2
  echo "== $name (at $((SECONDS - start)) s, limit ${limit} s)" >&2
  if ! timeout "$limit" "$@"; then
    echo "!! $name failed or ran past ${limit} s" >&2
    echo "$name" >> "$out/failed.txt"
  fi
}

step "gpu tests" 120 "$py" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$out/gpu_tests.xml" tests \
  > "$out/gpu_tests.txt" 2>&1
step "step gpt fp32" 110 sh -c "'$py' benchmarks/step_throughput.py --workload gpt --device cuda --repeats 3 --json \
  > '$out/step_gpt_cuda_32.json'"
step "step gpt bf16-mixed" 110 sh -c "'$py' benchmarks/step_throughput.py --workload gpt --device cuda \
  --precision bf16-mixed --repeats 3 --json > '$out/step_gpt_cuda_bf16.json'"
step "step small/large (CPU)" 90 sh -c "'$py' benchmarks/step_throughput.py --workload small --workload large \
  --repeats 3 --no-compile --json > '$out/step_mlp_cpu.json'"
step "data" 60 sh -c "'$py' benchmarks/data_throughput.py --quick --json > '$out/data.json'"
step "data to_device" 40 sh -c "'$py' - > '$out/data_to_device.json'" <<'EOF'
import json, time, torch
import fnlight, fnlight.data as fd
x, y = torch.randn(60_000, 784), torch.randint(0, 10, (60_000,))
out = {}
for size in (128, 1024):
    pipeline = fd.from_tensors(x, y) >> fd.shuffle() >> fd.batch(size) >> fd.to_device()
    with fnlight.DataModule(pipeline, seed=0, device="cuda") as dm:
        for _ in dm.batches("train", 0):  # warm-up epoch
            pass
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        for bx, by in dm.batches("train", 1):
            assert bx.is_cuda
            n += 1
        torch.cuda.synchronize()
        out[f"to_device.batch{size}.batches_per_s"] = round(n / (time.perf_counter() - t0), 1)
print(json.dumps(out))
EOF

echo "done in $((SECONDS - start)) s; results in $out/" >&2
ls -l "$out" >&2
[ ! -e "$out/failed.txt" ]
