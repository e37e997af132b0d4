"""FA4 API drift: the adapter must still compile FA4's real sm90 kernels (CPU, fake tensors)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fa4_inductor import fa4_adapter

SCRIPT = pathlib.Path(__file__).with_name("fa4_fake_compile.py")


def test_fa4_is_installed_and_matches_adapter():
    assert fa4_adapter.unavailable_reason() is None
    assert fa4_adapter.version() == fa4_adapter.TESTED_FA4_VERSION


@pytest.mark.skipif(fa4_adapter.unavailable_reason() is not None, reason="flash-attn-4 not importable")
def test_adapter_compiles_sm90_kernels_under_fake_tensors():
    env = dict(os.environ, FLASH_ATTENTION_ARCH="sm_90", CUTE_DSL_ARCH="sm_90a", FLASH_ATTENTION_NUM_SMS="132")
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["out"] == [2, 256, 8, 128] and result["lse"] == [2, 8, 256]
    assert result["lse_dtype"] == "torch.float32"
