"""Small edits of ONNX graphs shared by the exporter and the runtime's load-time rewrites."""

from __future__ import annotations


def drop_dead_nodes(graph) -> None:
    """Remove the nodes and initializers of an ONNX graph that no output depends on (left
    behind by constant folding at export and by attention fusion at load)."""
    live = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(inits)
