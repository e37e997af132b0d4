"""Built-in attention patterns, one module per idiom family.

Importing this package registers them with
:mod:`fa4_inductor.compile.sites`, in the order they are tried.
"""

from . import sdpa, aten_sdpa, eager_attention, flex_attention, multihead_attention, transformer_encoder_layer  # noqa: F401,E501
