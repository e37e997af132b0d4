"""FA4 API drift: the adapter must still compile FA4's real sm90 kernels (CPU, fake tensors)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fa4_inductor.runtime import fa4_binding

from fa4_inductor.runtime import fa4_version

SCRIPT = pathlib.Path(__file__).with_name("fa4_fake_compile.py")


def test_fa4_is_installed_and_a_tested_version():
    assert fa4_binding.unavailable_reason() is None
    assert fa4_version.version() in fa4_version.TESTED_FA4_VERSIONS


def test_the_gpu_extra_admits_the_tested_fa4_versions_and_installs_the_newest():
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((pathlib.Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    (fa4,) = [Requirement(r) for r in extras["optional-dependencies"]["gpu"] if r.startswith("flash-attn-4")]
    assert all(fa4.specifier.contains(v, prereleases=True) for v in fa4_version.TESTED_FA4_VERSIONS)
    prefix, newest = max((v.rsplit("b", 1) for v in fa4_version.TESTED_FA4_VERSIONS), key=lambda p: int(p[1]))
    assert not fa4.specifier.contains(f"{prefix}b{int(newest) + 1}", prereleases=True), fa4.specifier


ARCHS = {"sm90": ("sm_90", "sm_90a", "132"), "sm100": ("sm_100", "sm_100a", "148")}


def _start_fake_compile(cache_dir, arch: str) -> subprocess.Popen:
    flash_arch, dsl_arch, sms = ARCHS[arch]
    env = dict(os.environ, FLASH_ATTENTION_ARCH=flash_arch, CUTE_DSL_ARCH=dsl_arch, FLASH_ATTENTION_NUM_SMS=sms,
               FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED="1", FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=str(cache_dir))
    return subprocess.Popen([sys.executable, str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _result(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def first_compiles(tmp_path_factory) -> dict:
    """Both archs' first (JIT) fake compiles, run side by side: they take minutes each, one core each."""
    cache_dirs = {arch: tmp_path_factory.mktemp(f"fa4_cache_{arch}") for arch in ARCHS}
    processes = {arch: _start_fake_compile(cache_dirs[arch], arch) for arch in ARCHS}
    return {arch: (_result(process), cache_dirs[arch]) for arch, process in processes.items()}


def _check_kernels_compiled(result: dict, block: list[int]) -> None:
    assert result["forward_s"] > 0.2 and result["backward_s"] > 0.2, result  # really compiled
    assert result["again_s"] == 0.0, "the same config was precompiled twice"
    for name, seconds in result["plain"].items():
        assert seconds > 0.2, (name, "the kernels did not compile")
    for name, (seconds, route) in result["masked"].items():
        assert seconds > 0.2, (name, "the masked kernels did not compile")
        plain = name in ("padding_only_small", "softcap_window_gqa")  # the mask_mod on every tile; no mask_mod
        assert route == (None if plain else block), (name, route)
    for name, seconds in {**result["varlen"], **result["position_bias"]}.items():
        assert seconds > 0.2, (name, "the varlen or position-bias kernels did not compile")
    assert {"fwd", "bwd", "bwd_pre", "bwd_post"} <= set(result["disk_cache"]), result
    assert not result["warnings"], result["warnings"]


@pytest.mark.skipif(fa4_binding.unavailable_reason() is not None, reason="flash-attn-4 not importable")
def test_precompile_builds_sm90_kernels_under_fake_tensors_and_caches_them_on_disk(first_compiles):
    first, cache_dir = first_compiles["sm90"]
    _check_kernels_compiled(first, [128, 128])
    assert first["decode_splits"] == 16 and first["decode_s"] > 0.2, "the split-KV decoding kernel did not compile"
    # Launch plans (and the native launcher, which takes only TVM-FFI functions) must not call through Python.
    for kernels in ("forward_kernels_python_wrapped", "backward_kernels_python_wrapped"):
        assert first[kernels] and not any(first[kernels]), (kernels, "launch plans would call CuTe DSL's Python")
    second = _result(_start_fake_compile(cache_dir, "sm90"))  # a new process: kernels come from disk, no JIT
    assert second["forward_s"] < 0.5 and second["backward_s"] < 0.5, second
    for kernels in ("forward_kernels_python_wrapped", "backward_kernels_python_wrapped"):
        assert second[kernels] and not any(second[kernels]), (kernels, second)


@pytest.mark.skipif(fa4_binding.unavailable_reason() is not None, reason="flash-attn-4 not importable")
def test_precompile_builds_sm100_kernels_under_fake_tensors(first_compiles):
    _check_kernels_compiled(first_compiles["sm100"][0], [256, 128])
