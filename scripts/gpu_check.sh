#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine whose python3 already has torch (a lent GPU box, a user's node):
# the CUDA tests (tests/test_cuda.py and the profiler's CUDA test), then the GPU benchmarks (bench/gpu.py).
# Every log and the benchmark's JSON land in OUTDIR; each step has its own time limit, so a slow one cannot
# take the others' figures with it.
#   scripts/gpu_check.sh OUTDIR [TEST_LIMIT_S] [BENCH_LIMIT_S]
set -u
out=${1:?usage: scripts/gpu_check.sh OUTDIR [TEST_LIMIT_S] [BENCH_LIMIT_S]}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/apps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/nvidia_smi.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'transformers', transformers.__version__)" 2>&1 | tee "$out/env.txt"
t0=$SECONDS
timeout "${2:-240}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py "tests/test_profiler.py::test_cuda_timers_and_memory_snapshot" >"$out/tests.log" 2>&1
echo "tests: exit $?, $((SECONDS - t0)) s" | tee -a "$out/tests.log"; tail -25 "$out/tests.log"
t0=$SECONDS
timeout "${3:-330}" python3 bench/gpu.py --json-out "$out/bench.json" >"$out/bench.log" 2>&1
echo "bench: exit $?, $((SECONDS - t0)) s" | tee -a "$out/bench.log"; grep -v '^{' "$out/bench.log" | tail -40
