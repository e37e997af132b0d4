"""Eager mode: a dispatcher override that sends SDPA and its aten ops to FA4, falling back with a recorded reason."""
