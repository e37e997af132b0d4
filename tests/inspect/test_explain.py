"""Inspection: explain() reports, the CLI, JSON round trips, TORCH_LOGS and graph dumps."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fa4_inductor import Report, explain, stats
from tests.compare import EXCEPTION_TEXT

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _qkv(h=4, hkv=4, d=64, dtype=torch.bfloat16):
    torch.manual_seed(0)
    return (torch.randn(1, h, 8, d, dtype=dtype), torch.randn(1, hkv, 8, d, dtype=dtype),
            torch.randn(1, hkv, 8, d, dtype=dtype))


def test_known_sites_give_exact_records():
    def fn(q, k, v, kg, vg):
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        gqa = F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True)
        dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        manual = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        flat = torch.softmax(torch.bmm(q[0], k[0].transpose(1, 2)), dim=-1) @ v[0]  # 3-D: heads in the batch
        outer = torch.softmax(q[0][..., :1] * k[0][..., :1].transpose(1, 2), dim=-1) @ v[0]  # no q @ kᵀ: no pattern
        return causal + gqa + dropped + manual + flat + outer
    q, k, v = _qkv()
    _, kg, vg = _qkv(hkv=2)
    report = explain(fn, q, k, v, kg, vg)
    rows = [(r.pattern, r.decision, r.features.get("causal"), r.features.get("gqa_ratio")) for r in report.records]
    assert rows == [("sdpa", "fa4", True, 1), ("sdpa", "fa4", False, 2), ("sdpa", "fallback", False, 1),
                    ("eager_attention", "fa4", False, 1), ("eager_attention", "fa4", False, 1),
                    (None, "fallback", None, None)]
    assert "dropout_p=0.1" in report.records[2].reason
    files, lines = zip(*(r.location.rsplit(":", 1) for r in report.records))
    assert all(f.endswith("test_explain.py") for f in files)
    first = int(lines[0])
    assert [int(n) for n in lines] == [first + i for i in range(6)]  # the six lines of fn
    assert report.records[0].features["q_shape"] == "(1, 4, 8, 64)"
    assert "4 of 6 attention sites run FA4 on sm90" in str(report)
    assert stats.counters["compile.fa4"] == 0  # explaining is not compiling


def test_arch_changes_the_verdict():
    q, k, v = _qkv(d=256)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    assert explain(fn, q, k, v, arch="sm90").records[0].decision == "fa4"
    sm100 = explain(fn, q, k, v, arch="sm100").records[0]
    assert sm100.decision == "fa4"  # (256, 256) has an sm100 kernel
    q, k, v = _qkv(d=192)
    assert "sm100" in explain(fn, q, k, v, arch="sm100").records[0].reason
    assert "not routed" in explain(fn, q, k, v, arch=None, devices=("cuda",)).records[0].reason


@pytest.mark.parametrize("d, training, arch, runs_fa4", [
    (16, True, "sm90", False), (16, False, "sm90", True), (32, True, "sm90", True), (16, True, "sm100", True),
])
def test_head_dims_whose_sm90_gradients_fa4_gets_wrong_fall_back_in_training(d, training, arch, runs_fa4):
    q, k, v = (t.requires_grad_(training) for t in _qkv(d=d))
    record = explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, arch=arch).records[0]
    assert (record.decision == "fa4") == runs_fa4, record.reason
    if not runs_fa4:
        assert "PR #2896" in record.reason


def test_json_round_trip():
    q, k, v = _qkv()
    report = explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    again = Report.from_json(report.to_json())
    assert again.records == report.records and again.graphs == report.graphs
    assert json.loads(report.to_json())["records"][0]["decision"] == "fa4"
    assert "fa4.flash_attn_fwd" in report.graphs[0].after and "scaled_dot_product" in report.graphs[0].before


def test_bad_arch_is_a_value_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="sm90"):
        explain(lambda q: q, q, arch="hopper")


def test_cli_explain_writes_report_json_and_graphs(tmp_path):
    script = tmp_path / "model.py"
    script.write_text(
        "import torch, torch.nn.functional as F\n"
        "def build():\n"
        "    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)\n"
        "    return (lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True)), (q,)\n")
    done = subprocess.run(
        [sys.executable, "-m", "fa4_inductor", "explain", f"{script}:build", "--json", str(tmp_path / "r.json"),
         "--dump-graphs", str(tmp_path / "graphs")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 of 1 attention sites run FA4 on sm90" in done.stdout
    assert Report.from_json((tmp_path / "r.json").read_text()).records[0].decision == "fa4"
    assert "fa4.flash_attn_fwd" in (tmp_path / "graphs" / "graph0_after.py").read_text()


@pytest.mark.usefixtures("no_compile_cache")
def test_torch_logs_show_rewrites_and_graph_dumps():
    script = (
        "import torch, torch.nn.functional as F, fa4_inductor\n"
        "fa4_inductor.enable(devices=('cpu',), eager=False)\n"
        "q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)\n"
        "torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.0, is_causal=True))(q)\n"
        "torch.compile(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m))(q, torch.ones(8, 8, dtype=torch.bool))\n")
    env = dict(os.environ, TORCH_LOGS="+fa4_inductor", TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rewrote" in done.stderr and "-> fa4" in done.stderr
    assert "left" in done.stderr and "attn_mask" in done.stderr
    assert "after the fa4 rewrite" in done.stderr and "flash_attn_fwd" in done.stderr


def test_example_script_defines_build():
    from examples import tiny_llama

    model, (ids,) = tiny_llama.build()
    assert ids.shape == (2, 64) and isinstance(model, torch.nn.Module)


def test_masked_hf_model_report():
    """The README's example model: a materialized causal mask + repeat_kv, both seen through (transformers >= 5.23
    on torch >= 2.14 passes ``is_causal=True`` and ``enable_gqa`` under compile instead)."""
    from examples import tiny_llama

    model, (ids,) = tiny_llama.build()
    report = explain(model, ids[:, :16], arch="sm90")
    assert [(r.pattern, r.decision) for r in report.records] == [("sdpa", "fa4")] * 2
    for record in report.records:
        assert record.features["causal"] is True and record.features["gqa_ratio"] == 2
        materialized = "mask" in record.features
        assert record.features.get("mask", "analyzed") == "analyzed"
        assert record.features["gqa_repeat_removed"] is materialized
        assert record.module_path.endswith(("layers.0.self_attn", "layers.1.self_attn"))


def test_torch_trace_has_graph_artifacts(tmp_path):
    script = (
        "import torch, torch.nn.functional as F, fa4_inductor\n"
        "fa4_inductor.enable(devices=('cpu',), eager=False)\n"
        "q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)\n"
        "torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True))(q)\n")
    env = dict(os.environ, TORCH_TRACE=str(tmp_path), TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trace = "\n".join(p.read_text() for p in tmp_path.iterdir())
    assert '"name": "fa4_inductor_before"' in trace and '"name": "fa4_inductor_after"' in trace
    assert "flash_attn_fwd" in trace


def test_no_reason_carries_python_exception_text(monkeypatch):
    """A mask sympy refuses to combine, and an analysis that raises outright, give reasons that name the construct."""
    def fn(q, k, v):
        i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
        odd = torch.where((j <= i) * 2.5 > 1, 0.0, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=odd), F.scaled_dot_product_attention(q, k, v)

    odd, _ = explain(fn, *_qkv()).records
    assert odd.decision == "fallback" and "'mul'" in odd.reason and not EXCEPTION_TEXT.search(odd.reason), odd.reason
    from fa4_inductor.compile.patterns import sdpa

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for *: 'Not' and 'Float'")

    monkeypatch.setattr(sdpa, "decide", broken)
    torch._dynamo.reset()
    records = explain(fn, *_qkv()).records
    assert [r.decision for r in records] == ["fallback", "fallback"]
    for record in records:
        assert "sdpa analysis can't read the code at" in record.reason and not EXCEPTION_TEXT.search(record.reason)


def test_t5_reasons_name_constructs_not_exceptions():
    """T5's relative-position bias once surfaced sympy's exception text as its fallback reason."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1,
                                   num_heads=4)
    model = transformers.T5Model(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 16))
    report = explain(model, input_ids=ids, decoder_input_ids=ids, attention_mask=torch.ones(2, 16, dtype=torch.long))
    assert report.records
    for record in report.records:
        assert record.reason is None or not EXCEPTION_TEXT.search(record.reason), record.reason
