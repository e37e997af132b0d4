#!/usr/bin/env bash
# One device call (after FA4 is staged and /tmp/fa4-env.sh sourced): GPU tests,
# then the host-overhead, first-step and small-S attention benchmarks. Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip install -e . failed"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
FA4_GPU_RESULTS=$OUT/gpu_results.jsonl timeout 240 python3 -m pytest -q tests/test_gpu.py 2>&1 | tee $OUT/gpu_tests.log | tail -15
timeout 60 python3 benchmarks/bench_overhead.py --out $OUT 2>&1 | tail -20
timeout 200 python3 benchmarks/bench_first_step.py --out $OUT 2>&1 | tail -12
timeout 150 python3 benchmarks/bench_attention.py --out $OUT/bench --s 1024 --block-s 4096 2>&1 | grep -v "^{" | tail -20
