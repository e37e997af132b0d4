"""A ViT-B/16 train step whose attention is ``nn.MultiheadAttention`` (torchvision's and open_clip's encoder block),
stock ``torch.compile`` vs compiled with the plugin, side by side in one process.

ViT-B/16 at 224 px: 197 tokens, width 768, 12 heads of 64, MLP 3072, 12 pre-norm blocks of layer norm ->
``nn.MultiheadAttention(batch_first=True)(x, x, x, need_weights=False)`` -> residual -> layer norm -> MLP ->
residual; bf16, B=64; the step is forward, a loss, and backward. ``--padded`` adds a key padding mask (the last
tokens of every other image hidden), ``--weights-unread`` calls the attention as ``attn(x, x, x)[0]`` (DETR's way).
The two variants are timed in turns (ROUNDS rounds of one ``triton.testing.do_bench`` median each; the median round
is reported). Writes JSON and markdown to --out.

Usage: python benchmarks/bench_vit_mha.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics

import torch
import torch.nn as nn
from triton.testing import do_bench

import fa4_inductor
from fa4_inductor.runtime import fa4_version
from fa4_inductor import stats

ROUNDS = 5


class EncoderBlock(nn.Module):
    """Pre-norm block with nn.MultiheadAttention, as torchvision's ViT writes it."""

    def __init__(self, width: int, heads: int, mlp: int, weights_unread: bool):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))
        self.weights_unread = weights_unread

    def forward(self, x, padding=None):
        y = self.ln_1(x)
        if self.weights_unread:
            y = self.self_attention(y, y, y, key_padding_mask=padding)[0]
        else:
            y = self.self_attention(y, y, y, key_padding_mask=padding, need_weights=False)[0]
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """ViT-B/16 (patch 16, width 768, depth 12, heads 12, MLP 3072) with a linear head."""

    def __init__(self, weights_unread: bool = False, image: int = 224, patch: int = 16, width: int = 768,
                 depth: int = 12, heads: int = 12, mlp: int = 3072, classes: int = 1000):
        super().__init__()
        self.patchify = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, mlp, weights_unread) for _ in range(depth))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, images, padding=None):
        x = self.patchify(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        for block in self.blocks:
            x = block(x, padding)
        return self.head(self.ln(x[:, 0]))


def _step(model, images, labels, padding):
    def step():
        loss = nn.functional.cross_entropy(model(images, padding).float(), labels)
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def run(batch: int, padded: bool, weights_unread: bool) -> dict:
    """Time both variants of one configuration; returns its row."""
    torch.manual_seed(0)
    model = ViT(weights_unread).cuda().bfloat16()
    images = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    padding = None
    if padded:
        padding = torch.zeros(batch, 197, dtype=torch.bool, device="cuda")
        padding[::2, 150:] = True
    steps, sites = {}, {}
    for variant in ("stock", "plugin"):
        torch._dynamo.reset()
        stats.reset()
        if variant == "plugin":
            fa4_inductor.enable(compile=True, eager=False)
        steps[variant] = _step(torch.compile(model), images, labels, padding)
        steps[variant]()  # compile while this variant's settings hold
        fa4_inductor.disable()
        sites[variant] = sorted({f"{r.pattern}:{r.decision}" for r in stats.site_records()})
    times = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            times[name].append(do_bench(step, warmup=10, rep=100, return_mode="median"))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"batch": batch, "padded": padded, "weights_unread": weights_unread, "ms": medians,
            "speedup_vs_stock": medians["stock"] / medians["plugin"], "sites": sites}


def _markdown(result: dict) -> str:
    lines = [f"# ViT-B/16 train step, nn.MultiheadAttention ({result['device']}, torch {result['torch']}, "
             f"flash-attn-4 {result['fa4']})", "",
             "bf16, 197 tokens, forward + cross entropy + backward; medians of 5 interleaved do_bench rounds.", "",
             "| B | key padding | call | stock compile ms | plugin ms | plugin vs stock | plugin sites |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        call = "attn(x, x, x)[0]" if row["weights_unread"] else "need_weights=False"
        lines.append(f"| {row['batch']} | {'yes' if row['padded'] else 'no'} | {call} | {row['ms']['stock']:.2f} | "
                     f"{row['ms']['plugin']:.2f} | {row['speedup_vs_stock']:.3f}x | {', '.join(row['sites']['plugin'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tag", default="vit_mha_train")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "fa4": fa4_version.version(),
              "python": platform.python_version(), "rows": []}
    for padded, weights_unread in ((False, False), (True, False), (False, True)):
        result["rows"].append(run(args.batch, padded, weights_unread))
        print(json.dumps(result["rows"][-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.tag}.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
