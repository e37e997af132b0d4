"""Print the rewrite's per-site decisions for a tiny HF Llama on the GPU, padded batch, static and dynamic shapes."""
import torch
import transformers

import fa4_inductor
from fa4_inductor import stats

model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, attn_implementation="sdpa")).cuda().bfloat16()
ids = torch.randint(0, 128, (2, 256), device="cuda")
mask = torch.ones(2, 256, dtype=torch.long, device="cuda")
mask[1, :64] = 0
print("transformers", transformers.__version__, "torch", torch.__version__)
for dynamic in (False, True):
    torch._dynamo.reset()
    stats.reset()
    with fa4_inductor.enabled(compile=True, eager=False), torch.no_grad():
        torch.compile(model, dynamic=dynamic)(ids, attention_mask=mask)
    print("dynamic", dynamic, sorted({f"{r.decision}: {r.reason}" for r in stats.site_records()}))
