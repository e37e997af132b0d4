"""FX graphs before and after the rewrite, for logs, TORCH_TRACE and the CLI.

``TORCH_LOGS="+fa4_inductor"`` (DEBUG) prints both graphs of every rewritten
graph through the ``fa4_inductor.graphs`` logger; with ``TORCH_TRACE`` set
they become ``fa4_inductor_before`` / ``fa4_inductor_after`` artifacts that
tlparse shows. Rendering costs time, so it happens only when asked for.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from fa4_inductor import config

from fa4_inductor._torch_private import trace_artifact

graphs_log = logging.getLogger("fa4_inductor.graphs")


@dataclasses.dataclass
class GraphDump:
    """Readable code of one graph before and after the attention rewrite."""

    name: str
    before: str
    after: str


def wanted() -> bool:
    """Whether anyone will read graph dumps (DEBUG logging or TORCH_TRACE)."""
    return graphs_log.isEnabledFor(logging.DEBUG) or bool(config.TORCH_TRACE.value())


def graph_code(graph: torch.fx.Graph) -> str:
    """Python source of a graph, as FX prints it."""
    return graph.python_code("self").src


def emit(dump: GraphDump) -> None:
    """Send a dump to the log and the structured trace."""
    graphs_log.debug("%s before the fa4 rewrite:\n%s", dump.name, dump.before)
    graphs_log.debug("%s after the fa4 rewrite:\n%s", dump.name, dump.after)
    trace_artifact("fa4_inductor_before", lambda: dump.before)
    trace_artifact("fa4_inductor_after", lambda: dump.after)


def write_svg(graph_module: torch.fx.GraphModule, path: str) -> bool:
    """Render a graph as SVG when pydot and graphviz are installed; return whether it did."""
    try:
        from torch.fx.passes.graph_drawer import FxGraphDrawer

        FxGraphDrawer(graph_module, "graph").get_dot_graph().write_svg(path)
        return True
    except Exception:  # pydot/graphviz missing or failing: SVG is optional
        return False
