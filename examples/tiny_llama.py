"""Compile a tiny Hugging Face Llama with fa4_inductor and print the inspection report.

The model is built from a config with random weights (no hub access). On a
machine without an sm90+ GPU, attention runs on the plugin's CPU reference
implementation and the report says what would run FA4 on sm90.

    python examples/tiny_llama.py            # compile, train one step, print the report
    fa4-inductor explain examples/tiny_llama.py:build --arch sm90
"""

from __future__ import annotations

import logging

import torch
import transformers

import fa4_inductor


def build(attn_implementation: str = "sdpa"):
    """A tiny Llama (GQA 4:2) and a batch of token ids: ``(model, (input_ids,))``."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    input_ids = torch.randint(0, config.vocab_size, (2, 64), device=device)
    return model, (input_ids,)


def main() -> None:
    """Train one step compiled with the plugin, compare with eager, print the report."""
    logging.basicConfig(level=logging.WARNING)
    model, (input_ids,) = build()
    want = model(input_ids).logits.float()
    with fa4_inductor.enabled(devices=("cuda", "cpu")):
        compiled = torch.compile(model, backend="inductor")
        logits = compiled(input_ids).logits.float()
        logits.square().mean().backward()
    print(f"compiled-with-plugin vs eager logits: max abs diff {(logits - want).abs().max().item():.3g}")
    print(fa4_inductor.explain(model, input_ids, arch="sm90"))
    # A padded batch (row 1 left-padded) and a packed one (three sequences per row, restarting position_ids):
    # key padding and documents, and-ed with causal, become FA4 block sparsity.
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :20] = 0
    print("\nleft-padded batch:", fa4_inductor.explain(model, input_ids, attention_mask=attention_mask, arch="sm90"))
    positions = torch.cat([torch.arange(n) for n in (20, 30, 14)]).to(input_ids.device).expand_as(input_ids)
    print("\npacked batch:", fa4_inductor.explain(model, input_ids, position_ids=positions, use_cache=False,
                                                    arch="sm90"))
    # The same model on Hugging Face's FlexAttention integration: its flex_attention calls become FA4 calls.
    model.set_attn_implementation("flex_attention")
    with torch.no_grad():
        print("\nflex_attention, left-padded batch:",
              fa4_inductor.explain(model, input_ids, attention_mask=attention_mask, arch="sm90"))


if __name__ == "__main__":
    main()
