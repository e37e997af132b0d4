"""FSDP2 with the plugin: two gloo processes on CPU train a compiled, sharded Llama with FA4's ops."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "fsdp_train.py"


def test_fsdp2_sharded_compiled_layers_run_fa4_on_every_rank_and_match_stock_losses():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
               str(SCRIPT), "--device", "cpu", "--steps", "3"]
    # Site records are written when the rewrite runs, i.e. on an Inductor cache miss: caches off.
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert result["world_size"] == 2 and len(result["ranks"]) == 2
    for rank in result["ranks"]:
        assert rank["plugin"]["sites"] == ["fa4: sdpa"], rank["plugin"]["sites"]
        for stock, plugin in zip(rank["stock"]["losses"], rank["plugin"]["losses"]):
            assert abs(stock - plugin) < 2e-2, (rank["stock"]["losses"], rank["plugin"]["losses"])
