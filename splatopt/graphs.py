"""The inner loop without the host: a learning-rate table on the device, steps replayed as CUDA graphs.

    loop = AdamLoop(gradients, params, state, optimizer, steps, v_scale, cuda_graphs=True)
    loop.run(50)               # steps 0..49, then read loop.params (a record), then
    loop.run(steps)

A small batch's inner step is bound by the host: an eager step is a hundred or more kernel
launches of a few microseconds of work each. A CUDA graph launches a captured sequence at once.
Capture needs a step that reads nothing from the host and writes the same memory every time, so
the per-step learning rates come from a table in device memory indexed by a device step counter,
Adam's step count is a device tensor, and each step's results are copied into static buffers.
``fit`` uses :class:`AdamLoop` on CUDA for the PyTorch step (render, objective, autograd, Adam)
and :class:`splatopt.kernels.FusedAdamLoop` for its fused MSE step; both capture with
:func:`capture_steps`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .optim import GROUPS, InnerOptimizer, adam_step


def learning_rate_table(optimizer: InnerOptimizer, total: int) -> Tensor:
    """[total, 4] float64 (CPU): ``optimizer.learning_rates(i, total)`` per step, in ``GROUPS`` order (v before the target RMS)."""
    return torch.tensor([[float(optimizer.learning_rates(i, total, 1.0)[k]) for k in GROUPS] for i in range(total)],
                        dtype=torch.float64).reshape(total, len(GROUPS))


def warm_up(step: Callable[[], None]) -> None:
    """Run ``step`` once on a side stream, as ``torch.cuda.graphs`` asks before a capture.

    Lazy initialization (a kernel's compilation, cuBLAS's workspace for a stream) must not happen
    inside a capture; running the step once outside triggers it.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)


def capture_steps(step: Callable[[], None], count: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``count`` calls of ``step`` (recorded, not run: the device state is unchanged).

    ``step`` must read and write the same tensors every call and never synchronize with the host
    (a read-back inside a capture fails loudly, so a replayed loop is sync-free by construction).
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(count):
            step()
    return graph


class AdamLoop:
    """``adam_step`` on ``gradients(params)`` for a fit's steps, in place in static buffers.

    gradients: ``{name: [B, ...] tensor} -> {name: gradient}`` (render, objective, autograd; no
    host reads). params, state: as ``adam_init`` / ``adam_step`` shape them (copied in, never
    written). v_scale: [B, 1, 1], the per-prompt factor on ``lr_v``. Each step equals ``adam_step``
    with ``optimizer.learning_rates(step, steps, v_scale)`` (Adam's step count on the device in
    float64: bias corrections as the host computes them). cuda_graphs: after one step run eagerly,
    ``unroll`` steps at a time are captured once (once per free mask: give :meth:`run` the same mask
    tensor for a freeze) and replayed. metric: [d, d], ``adam_step``'s.
    """

    def __init__(self, gradients: Callable[[dict[str, Tensor]], dict[str, Tensor]], params: dict[str, Tensor],
                 state: dict, optimizer: InnerOptimizer, steps: int, v_scale: Tensor, cuda_graphs: bool = False,
                 unroll: int = 2, metric: Tensor | None = None):
        dev = next(iter(params.values())).device
        if cuda_graphs and dev.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs CUDA tensors, got {dev}")
        self.gradients, self.optimizer, self.v_scale, self.metric = gradients, optimizer, v_scale, metric
        self.step, self.total, self.cuda_graphs, self.unroll = 0, steps, cuda_graphs, unroll
        self.params = {k: t.detach().clone() for k, t in params.items()}
        self.state: dict[str, Any] = {"m": {k: state["m"][k].clone() for k in params},
                                      "v": {k: state["v"][k].clone() for k in params},
                                      "t": torch.tensor(float(state["t"]), dtype=torch.float64, device=dev)}
        self.skipped = torch.zeros(v_scale.shape[0], dtype=torch.long, device=dev)
        self._table = learning_rate_table(optimizer, max(steps, 1)).to(device=dev, dtype=torch.float32)
        self._counter = torch.zeros(1, dtype=torch.long, device=dev)
        self._graph: torch.cuda.CUDAGraph | None = None
        # what the graph was captured with: the free mask itself (its memory is read at every replay,
        # so the loop keeps it alive) and the held groups; another pair is captured anew
        self._graph_free: Tensor | None = None
        self._graph_held: tuple[str, ...] = GROUPS

    def _one(self, free: Tensor | None = None, held: tuple[str, ...] = GROUPS) -> None:
        row = self._table[self._counter][0]
        lrs: dict[str, Tensor | float] = {k: row[i] * self.v_scale if k == "v" else row[i] for i, k in enumerate(GROUPS)}
        if free is not None:
            f = free.to(row.dtype)
            lrs = {k: lr * (f[..., None] if k == "v" else f) if k in held else lr for k, lr in lrs.items()}
        params, state, skipped = adam_step(self.params, self.gradients(self.params), self.state, lrs, self.optimizer, self.metric)
        with torch.no_grad():
            for k in self.params:
                self.params[k].copy_(params[k])
                self.state["m"][k].copy_(state["m"][k])
                self.state["v"][k].copy_(state["v"][k])
            self.state["t"].copy_(state["t"])
            self.skipped.add_(skipped)
            self._counter.add_(1)

    def run(self, stop: int, free: Tensor | None = None, held: tuple[str, ...] = GROUPS) -> None:
        """Take steps ``self.step .. stop - 1``. free: [B, N] bool, slots that may change in them (None: all);
        held: the parameter groups the others keep (the rest change in every slot)."""
        if not self.step <= stop <= self.total:
            raise ValueError(f"run({stop}): the loop is at step {self.step} of {self.total}")
        while self.step < stop:
            captured = self._graph is not None and self._graph_free is free and self._graph_held == held
            if self._graph is not None and captured and stop - self.step >= self.unroll:
                self._graph.replay()
                self.step += self.unroll
                continue
            if self.cuda_graphs and not captured:
                # the warm-up is this step; another free mask (a freeze that ends) is captured anew
                warm_up(lambda: self._one(free, held))
                self._graph = capture_steps(lambda: self._one(free, held), self.unroll)
                self._graph_free, self._graph_held = free, held
            else:
                self._one(free, held)
            self.step += 1
