"""Run time: the ``torch.ops.fa4`` custom ops (schemas, fake impls, autograd, the CPU reference), the FA4 binding
and its version facts, launch plans and their checks, the native launcher, masking buffers and block lists, split-KV.
Imports nothing from the compile, eager or inspection layers.
"""
