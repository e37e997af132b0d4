"""A model zoo: tiny random-weight configs of many ``transformers`` architectures, each with what the plugin is
expected to decide at every attention site (FA4, or the class of reason FA4 can't serve it).

``tests/models/test_zoo.py`` compiles each with the plugin (sdpa and eager attention, padded and not) and checks the
decisions and the numbers; the README's model table is generated from :data:`ZOO` (``python -m tests.support_table``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
              num_attention_heads=4)
SEQ2SEQ = dict(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
BATCH, LENGTH, DECODER_LENGTH = 2, 16, 12

# What a site's decision is called in the expectations: FA4, FA4 behind the run-time mask check, or the class of
# the reason it stays with PyTorch (the first phrase its reason contains; else the reason itself).
FA4, CHECKED = "FA4", "FA4, mask checked at run time"
LEARNED_BIAS, UNMATCHED, MASK = "PyTorch: learned bias", "PyTorch: scores not matched", "PyTorch: mask not FA4's"
REASON_CLASSES = {"needs a gradient": LEARNED_BIAS, "not attention": UNMATCHED, "not expressible": MASK,
                  "dropout": "PyTorch: dropout"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One architecture: its ``model_type``, the kind of inputs it takes, config values over the family's tiny
    defaults, and the decision expected at each site in graph order, per attention implementation (``sites``: one
    tuple for both, or a dict by implementation; an implementation missing there is not supported by the model)."""

    model_type: str
    family: str  # decoder, encoder, vision, seq2seq, speech, clip
    sites: tuple[str, ...] | dict[str, tuple[str, ...]]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    padded: bool = True  # whether the model takes an attention mask

    def expected(self, impl: str) -> tuple[str, ...] | None:
        """The expected decision per site with ``impl`` attention, or None where the model does not support it."""
        return self.sites.get(impl) if isinstance(self.sites, dict) else self.sites

    @property
    def implementations(self) -> tuple[str, ...]:
        return tuple(self.sites) if isinstance(self.sites, dict) else ("sdpa", "eager")


def _decoder(model_type: str, sites=(FA4,), **config) -> Architecture:
    return Architecture(model_type, "decoder", sites, config)


def _encoder(model_type: str, sites=(FA4,), **config) -> Architecture:
    return Architecture(model_type, "encoder", sites, config)


def _vision(model_type: str, sites=(FA4,), **config) -> Architecture:
    return Architecture(model_type, "vision", sites, config, padded=False)


def _seq2seq(model_type: str, sites=(FA4, FA4, FA4), **config) -> Architecture:
    return Architecture(model_type, "seq2seq", sites, config)


ZOO: tuple[Architecture, ...] = (
    _decoder("llama"), _decoder("mistral", sliding_window=8), _decoder("qwen2"), _decoder("qwen3"),
    _decoder("gemma"), _decoder("gemma2", sliding_window=8), _decoder("gemma3_text", sliding_window=8),
    # Not Phi and GPT-NeoX: stock Inductor's CPU code for their bf16 graphs fails to compile (torch 2.13, a
    # reduction's variable declared twice), with or without the plugin.
    _decoder("phi3"), _decoder("gpt2", n_embd=64, n_layer=1, n_head=4),
    _decoder("opt", ffn_dim=128, word_embed_proj_dim=64), _decoder("granite"), _decoder("helium"),
    _decoder("nemotron"),
    _decoder("falcon", new_decoder_architecture=True), _decoder("olmo"), _decoder("olmo2"), _decoder("cohere"),
    _decoder("stablelm"), _decoder("starcoder2"), _decoder("biogpt"),
    _decoder("gpt_neo", {"eager": (UNMATCHED,)}, num_layers=1, num_heads=4, attention_types=[[["global"], 1]]),
    _decoder("xglm", {"eager": (FA4,)}, d_model=64, ffn_dim=128, num_layers=1),
    _decoder("codegen", {"eager": (FA4,)}, n_embd=64, n_layer=1, n_head=4, rotary_dim=8),  # 5.17: scaled after the mask
    _decoder("bloom", {"eager": (FA4,)}, n_embd=64, n_layer=1, n_head=4),  # ALiBi: a bias per key
    _decoder("mpt", {"eager": (FA4,)}, d_model=64, n_heads=4, n_layers=1, expansion_ratio=2, max_seq_len=64),  # ALiBi
    _encoder("bert"), _encoder("roberta"), _encoder("distilbert", dim=64, hidden_dim=128, n_layers=1, n_heads=4),
    _encoder("electra", embedding_size=64), _encoder("albert", embedding_size=64),
    _encoder("modernbert", global_attn_every_n_layers=1), _encoder("megatron-bert", {"eager": (FA4,)}),
    _encoder("mpnet", {"eager": (LEARNED_BIAS,)}),  # a learned relative-position bias, then the padding mask
    _encoder("deberta-v2", {"eager": (UNMATCHED,)}),  # disentangled attention: position terms in the scores
    _vision("vit"), _vision("deit"), _vision("dinov2"), _vision("beit"),
    _vision("yolos", image_size=[32, 32], num_detection_tokens=2),
    _vision("clip_vision_model"), _vision("siglip_vision_model", (FA4, FA4)),  # the pooling head's attention too
    _seq2seq("bart"), _seq2seq("mbart"), _seq2seq("marian"), _seq2seq("pegasus"), _seq2seq("blenderbot"),
    _seq2seq("m2m_100"),
    # T5's self-attention adds a learned position bias (cross-attention's is zeros): in training, it needs a gradient.
    # Not UMT5: on torch 2.13 with transformers 5.17, Dynamo alone (backend="eager", no plugin) gives outputs 44 %
    # away from the uncompiled model's, a stock difference the zoo can't judge the plugin against.
    *(Architecture(name, "seq2seq", (LEARNED_BIAS, LEARNED_BIAS, FA4),
                   dict(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, vocab_size=128,
                        decoder_start_token_id=0)) for name in ("t5", "mt5")),
    Architecture("whisper", "speech", (FA4, FA4, FA4), {**SEQ2SEQ, "num_mel_bins": 8, "max_source_positions": 32,
                                                        "max_target_positions": 64}),
    Architecture("clip", "clip", (FA4, FA4), {}), Architecture("siglip", "clip", (FA4, FA4, FA4), {}),
)


def config_of(architecture: Architecture):
    """The tiny config: the family's defaults, the architecture's values, every dropout (``*dropout*``, ``*pdrop``,
    LayerDrop, drop path) at 0."""
    import transformers

    family = {"decoder": TEXT, "encoder": TEXT, "vision": VISION, "seq2seq": SEQ2SEQ, "speech": {}, "clip": {}}
    values = {**family[architecture.family], **architecture.config}
    if architecture.family == "clip":
        text = {k: v for k, v in TEXT.items() if k not in ("num_key_value_heads", "head_dim")}
        values = dict(text_config=text, vision_config=VISION, projection_dim=32)
    config = transformers.AutoConfig.for_model(architecture.model_type, **values)
    if "head_dim" in vars(config) and "head_dim" not in values and architecture.family in ("decoder", "encoder"):
        config.head_dim = config.hidden_size // config.num_attention_heads  # not the full-size default (128, 256)
    for sub in (config, *(getattr(config, name, None) for name in ("text_config", "vision_config"))):
        if sub is None:
            continue
        for name in list(vars(sub)):
            if "drop" in name and isinstance(getattr(sub, name), float):
                setattr(sub, name, 0.0)
    return config


def build(architecture: Architecture, impl: str) -> torch.nn.Module:
    """The base model (no head) with ``impl`` attention, in float32, in training mode."""
    import transformers

    model = transformers.AutoModel.from_config(config_of(architecture), attn_implementation=impl)
    return model.train()


def inputs(architecture: Architecture, padded: bool, dtype: torch.dtype) -> dict[str, Any]:
    """Model inputs; a padded batch hides its second row's last 6 tokens."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (BATCH, LENGTH), generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, LENGTH - 6:] = 0
    pixels = torch.randn(BATCH, 3, 32, 32, generator=generator, dtype=dtype)
    family = architecture.family
    if family == "vision":
        return dict(pixel_values=pixels)
    masked = {"attention_mask": mask} if padded else {}
    if family == "clip":
        return dict(input_ids=ids, pixel_values=pixels, **masked)
    if family == "speech":
        features = torch.randn(BATCH, 8, 64, generator=generator, dtype=dtype)
        return dict(input_features=features, decoder_input_ids=ids[:, :DECODER_LENGTH],
                    **({"decoder_attention_mask": mask[:, :DECODER_LENGTH]} if padded else {}))
    if family == "seq2seq":
        return dict(input_ids=ids, decoder_input_ids=ids[:, :DECODER_LENGTH], **masked)
    return dict(input_ids=ids, **masked)


def reason_class(record) -> str:
    """The expectation's name for a site record's decision."""
    if record.decision == "fa4":
        return CHECKED if record.features.get("mask") == "data, checked at run time" else FA4
    reason = record.reason or ""
    return next((name for phrase, name in REASON_CLASSES.items() if phrase in reason), reason)
