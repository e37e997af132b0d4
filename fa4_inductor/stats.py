"""Counters and per-site records of what the plugin did, and why not.

Eager calls are counted (``eager.fa4`` / ``eager.fallback`` and one
counter per reason); graph rewrites leave one :class:`SiteRecord` per
attention site, which :func:`fa4_inductor.explain` and the ``TORCH_LOGS``
artifact read. Each distinct fallback reason is logged once at INFO, every
occurrence at DEBUG, under the ``fa4_inductor`` logger. Launch-plan checks
(:mod:`.plan_trust`) are counted under ``plans.*``; a failed one is logged
as a warning, once per kind of call.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any

import torch

log = logging.getLogger("fa4_inductor")

counters: collections.Counter = collections.Counter()
fallback_reasons: collections.Counter = collections.Counter()
_site_records: collections.deque = collections.deque(maxlen=10_000)
_logged_reasons: set[tuple[str, str]] = set()
_lock = threading.Lock()


@dataclasses.dataclass
class SiteRecord:
    """One attention site of a compiled graph and what became of it."""

    graph: str
    node: str
    target: str
    pattern: str | None
    decision: str  # "fa4" or "fallback"
    reason: str | None
    location: str | None
    module_path: str | None
    features: dict[str, Any]
    anchor: str | None = None  # the node the pattern matched on, when not ``node``

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of this record."""
        return dataclasses.asdict(self)


def record_eager(decision: str, op: str, reason: str | None = None) -> None:
    """Count one eager call routed to FA4 (``decision="fa4"``) or to the stock kernel.

    Calls made while Dynamo traces (on fake tensors) are not eager calls and
    are not counted.
    """
    if torch.compiler.is_compiling():
        return
    with _lock:
        counters[f"eager.{decision}"] += 1
        counters[f"eager.{decision}.{op.removeprefix('aten::')}"] += 1
        if reason is None:
            return
        fallback_reasons[(op, reason)] += 1
        first = (op, reason) not in _logged_reasons
        _logged_reasons.add((op, reason))
    (log.info if first else log.debug)("eager %s -> stock kernel: %s", op, reason)


def count_data_mask(served: bool, reason: str | None, remembered: bool) -> None:
    """Count one call whose mask is data: run on FA4 or on the dense route (the reason logged once), and whether
    its verdict was remembered or read from the mask (a host sync)."""
    with _lock:
        counters["data_mask.fa4" if served else "data_mask.pytorch"] += 1
        counters["data_mask.remembered" if remembered else "data_mask.read"] += 1
        if served:
            return
        fallback_reasons[("fa4.flash_attn_data_mask", reason)] += 1
        first = ("data_mask", reason) not in _logged_reasons
        _logged_reasons.add(("data_mask", reason))
    (log.info if first else log.debug)("a mask given as data -> dense attention: %s", reason)


def record_site(record: SiteRecord) -> None:
    """Keep a compiled site's record, count it and log the decision."""
    with _lock:
        _site_records.append(record)
        counters[f"compile.{record.decision}"] += 1
        if record.pattern:
            counters[f"pattern.{record.pattern}.{record.decision}"] += 1
        if record.reason:
            fallback_reasons[(record.target, record.reason)] += 1
    if record.decision == "fa4":
        log.info("rewrote %s (%s) at %s -> fa4 %s", record.node, record.pattern, record.location, record.features)
    else:
        log.info("left %s at %s on the stock path: %s", record.node, record.location, record.reason)


def record_plan_check(kind: str, failure: str | None) -> None:
    """Count one launch-plan check of a ``kind`` of call (``forward``, ``backward``, ...): passed when ``failure``
    is None, else failed for that reason (the call then ran on FA4's own outputs)."""
    with _lock:
        counters["plans.checked"] += 1
        if failure is None:
            return
        counters["plans.check_failed"] += 1
        counters[f"plans.check_failed.{kind}"] += 1
        first = ("plans", kind) not in _logged_reasons
        _logged_reasons.add(("plans", kind))
    (log.warning if first else log.debug)(
        "fa4_inductor: a %s launch plan disagreed with FA4's own call and is not used (%s); that call signature "
        "runs FA4's entry point from now on", kind, failure)


def site_records() -> list[SiteRecord]:
    """All site records kept so far (oldest first)."""
    with _lock:
        return list(_site_records)


def reset() -> None:
    """Clear counters, reasons and site records."""
    with _lock:
        counters.clear()
        fallback_reasons.clear()
        _site_records.clear()
        _logged_reasons.clear()
