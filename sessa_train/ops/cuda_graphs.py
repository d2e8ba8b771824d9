"""Replay of a solve's whole chunk loop from a CUDA graph: one launch instead of one per kernel.

``graphed(fn, tensors, *args)`` runs ``fn(*tensors, *args)`` from a graph captured once per key
(the tensors' shapes, dtypes and device, and ``args``). The first call of a key runs ``fn``
eagerly (Triton compiles and autotunes there), then captures it on copies of the inputs; each
call copies its inputs in, replays, and returns copies of the outputs (the graph's own are
overwritten by the next replay). At most ``MAX_GRAPHS`` graphs (and their static buffers) are
kept, the least recently used going first: training has a handful of shapes, and the solvers
only replay for training steps (``ops.feedback``), not for every prompt length of generation.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

MAX_GRAPHS = 8
_GRAPHS: OrderedDict[tuple, tuple] = OrderedDict()


def graphed(fn, tensors: tuple[torch.Tensor | None, ...], *args):
    key = (fn.__name__, *(None if t is None else (t.shape, t.dtype, t.device) for t in tensors), *args)
    entry = _GRAPHS.get(key)
    if entry is None:
        fn(*tensors, *args)
        torch.cuda.synchronize()
        static = tuple(None if t is None else t.clone() for t in tensors)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*static, *args)
        entry = _GRAPHS[key] = (graph, static, out)
        while len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    graph, static, out = entry
    for dst, src in zip(static, tensors, strict=True):
        if src is not None:
            dst.copy_(src)
    graph.replay()
    return tuple(o.clone() for o in out)
