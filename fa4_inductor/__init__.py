"""fa4-inductor: FlashAttention-4 for eager PyTorch and ``torch.compile``.

``fa4_inductor.enable()`` routes attention to FA4: compiled graphs get their
attention sites rewritten into ``torch.ops.fa4`` calls, eager SDPA's flash
kernels are overridden, and whatever FA4 can't serve stays on PyTorch's
kernels with a recorded reason. ``fa4_inductor.explain(fn, *args)`` shows
what happened at every attention site.
"""

from fa4_inductor.runtime import ops  # noqa: F401  (registers torch.ops.fa4)
from fa4_inductor import stats
from fa4_inductor.api import Settings, disable, enable, enabled, settings
from fa4_inductor.inspection.explain import Report, explain
from fa4_inductor.runtime.support import AttentionCall, unsupported_reason

__all__ = [
    "AttentionCall", "Report", "Settings", "disable", "enable", "enabled", "explain", "settings", "stats",
    "unsupported_reason",
]
