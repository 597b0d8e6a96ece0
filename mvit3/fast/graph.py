"""CUDA-graph replay of a fast model, for batch-1 latency.

A graph is captured per input signature (shape, dtype, device, strides) on first use and
replayed afterwards: one CPU call launches the whole forward. The weights are read at replay
time from the same memory, and the graphs are re-captured if the model's weights change: a
fast model's graphs read its derived weights (`plan()`), so they are captured again when
the plan is rebuilt, which is checked per call without walking the parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model import DerivedWeights


class CudaGraphModel(nn.Module):
    """Wraps an eval-mode fast model; call it like the model (inference only)."""

    def __init__(self, model: nn.Module, warmup: int = 2, clone_output: bool = True):
        super().__init__()
        self.model = model
        self.warmup = warmup
        self.clone_output = clone_output
        self._graphs = {}  # signature -> (graph, static input, static output)
        self._captured_plan = None  # the fast model's plan whose weights the graphs read

    def _signature(self, x: Tensor) -> tuple:
        return (tuple(x.shape), x.dtype, x.device, x.stride())

    def _capture(self, x: Tensor):
        static_in = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_in.copy_(x)
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # warm-up compiles kernels and fills the allocator
            for _ in range(self.warmup):
                self.model(static_in)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model(static_in)
        return graph, static_in, static_out

    def _graph_for(self, x: Tensor) -> tuple:
        """(graph, static input, static output) for x's signature, captured if needed: the
        host work of a replayed call before its copy and replay."""
        plan = self.model.plan() if isinstance(self.model, DerivedWeights) else None
        if plan is not self._captured_plan:
            self._graphs.clear()  # weights replaced or edited: capture again
            self._captured_plan = plan
        signature = self._signature(x)
        if signature not in self._graphs:
            self._graphs[signature] = self._capture(x)
        return self._graphs[signature]

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cuda:
            raise ValueError(f"CUDA-graph replay needs a CUDA input, got one on {x.device}")
        if self.model.training:
            raise RuntimeError("CUDA-graph replay is for inference: call .eval() on the model first")
        graph, static_in, static_out = self._graph_for(x)
        static_in.copy_(x)
        graph.replay()
        if not self.clone_output:
            return static_out
        if isinstance(static_out, tuple):  # SSDLite: (scores, locations)
            return tuple(t.clone() for t in static_out)
        return static_out.clone()

    def reset(self) -> None:
        """Drop every captured graph (and the memory they hold)."""
        self._graphs.clear()


def cuda_graph(model: nn.Module, warmup: int = 2, clone_output: bool = True) -> CudaGraphModel:
    """Replay `model` from CUDA graphs captured per input shape and dtype.

    With clone_output=False the returned tensor is the graph's own output buffer, overwritten
    by the next call of the same shape (one copy kernel less)."""
    return CudaGraphModel(model, warmup=warmup, clone_output=clone_output)
