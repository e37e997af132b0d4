#!/usr/bin/env bash
# On the GPU machine, after FA4 is staged (/tmp/fa4-env.sh sourced): install the package, run the
# GPU tests, then the host-overhead, first-step and attention benchmarks. Results go to $OUT.
# BENCH_ARGS is passed to bench_attention.py (e.g. "--s 1024 --block-s 4096" for a short run).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip install -e . failed"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
FA4_GPU_RESULTS=$OUT/gpu_results.jsonl timeout 300 python3 -m pytest -q tests/test_gpu.py 2>&1 | tee $OUT/gpu_tests.log | tail -15
timeout 90 python3 benchmarks/bench_overhead.py --out $OUT 2>&1 | tail -16
timeout 240 python3 benchmarks/bench_first_step.py --out $OUT 2>&1 | tail -10
timeout 300 python3 benchmarks/bench_attention.py --out $OUT/bench ${BENCH_ARGS:-} 2>&1 | grep -v "^{" | tail -25
