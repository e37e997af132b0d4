#!/usr/bin/env bash
# Set up and run the CPU test suite twice, side by side: on the pinned set (.venv: torch 2.13.0 and the [test]
# pins) and on the newest releases (.venv-newest: the newest torch, flash-attn-4, transformers and CuTe DSL the
# package index serves). A drift in any of them fails here, not in a user's run. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test]"
# This machine's pip configuration may cap torch (a constraints file); the newest set must not inherit it.
constraints=$(mktemp)
python3 -m venv .venv-newest
PIP_CONSTRAINT=$constraints .venv-newest/bin/pip install -q --upgrade "torch>=2.15" "flash-attn-4>=4.0.0b40" \
  "transformers>=5.23" "nvidia-cutlass-dsl>=4.8.1" triton "pytest>=8"
PIP_CONSTRAINT=$constraints .venv-newest/bin/pip install -q --no-deps -e .
rm -f "$constraints"
logs=$(mktemp -d)
status=0
for venv in .venv .venv-newest; do
  $venv/bin/python -c "import importlib.metadata as m; print('$venv:', ', '.join(p + ' ' + m.version(p) for p in \
    ('torch', 'flash-attn-4', 'nvidia-cutlass-dsl', 'transformers', 'triton')))"
done
# Two runs on two cores: one torch thread each, each with an Inductor cache of its own made for this run (two
# processes writing one cache race on its compiled libraries, and a run killed mid-write leaves a truncated one).
for venv in .venv .venv-newest; do
  OMP_NUM_THREADS=1 TORCHINDUCTOR_CACHE_DIR="$logs/inductor-${venv#.}" \
    $venv/bin/python -m pytest -q -p no:cacheprovider "$@" > "$logs/${venv#.}.log" 2>&1 &
  eval "pid_${venv//[.-]/_}=$!"
done
for venv in .venv .venv-newest; do
  pid_name="pid_${venv//[.-]/_}"
  if wait "${!pid_name}"; then result=passed; else result=FAILED; status=1; fi
  echo "== $venv: $result"
  if [ "$result" = passed ]; then tail -n 3 "$logs/${venv#.}.log"; else tail -n 120 "$logs/${venv#.}.log"; fi
done
exit $status
