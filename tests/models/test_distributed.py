"""Distributed runs on CPU (two gloo processes, the reference kernels).

FSDP2: a compiled, sharded Llama trains with FA4's ops. Context parallelism: ring attention's
per-shard flash calls run through the plugin and match the unsharded attention, eager and compiled.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _start_two_ranks(script: str, *args: str) -> subprocess.Popen:
    # --standalone: a local rendezvous on a free port, so runs on one host don't collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(EXAMPLES / script), "--device", "cpu", *args]
    # Caches off: each run compiles (and rewrites) afresh.
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))


def _run_two_ranks(script: str, *args: str) -> dict:
    return _result(_start_two_ranks(script, *args))


def test_fsdp2_sharded_compiled_layers_run_fa4_on_every_rank_and_match_stock_losses():
    result = _run_two_ranks("fsdp_train.py", "--steps", "3")
    assert result["world_size"] == 2 and len(result["ranks"]) == 2
    for rank in result["ranks"]:
        assert rank["plugin"]["sites"] == ["fa4: sdpa"], rank["plugin"]["sites"]
        for stock, plugin in zip(rank["stock"]["losses"], rank["plugin"]["losses"]):
            assert abs(stock - plugin) < 2e-2, (rank["stock"]["losses"], rank["plugin"]["losses"])


def test_context_parallel_ring_shards_run_fa4_and_match_unsharded_attention():
    """Two jobs at once on this host, as two test runs would be: each finds a free port."""
    for result in [_result(process) for process in [_start_two_ranks("context_parallel.py") for _ in range(2)]]:
        _check_context_parallel(result)


def _check_context_parallel(result: dict) -> None:
    assert result["world_size"] == 2
    assert [(case["causal"], case["compiled"]) for case in result["cases"]] == [
        (False, False), (True, False), (False, True), (True, True)]
    for case in result["cases"]:
        counters = case["counters"]
        if case["compiled"]:  # the rewrite left the DTensor SDPA to CP: one recorded fallback, no graph break
            assert counters["pattern.sdpa.fallback"] == 1, counters
        # One ring step per rank in each direction, every one on FA4's op; nothing fell back.
        assert counters["eager.fa4._scaled_dot_product_flash_attention"] == 2, counters
        assert counters["eager.fa4._scaled_dot_product_flash_attention_backward"] == 2, counters
        assert counters.get("eager.fallback", 0) == 0, counters
        for name, err in case["max_abs_err"].items():
            assert err <= 1e-2 * case["reference_max_abs"][name] + 1e-3, (case["causal"], name, err)
