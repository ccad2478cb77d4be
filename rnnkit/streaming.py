"""Streaming: feed a sequence chunk by chunk and carry the state.

Every rnnkit layer streams by construction: passing each call's returned state
into the next call gives the same outputs and final state as one call on the
whole sequence. These helpers cover what a streaming user needs around that:

* :func:`detach_state` cuts the graph for truncated backpropagation through time,
* :func:`reset_state` zeroes the state of chosen batch rows (episode or
  utterance boundaries),
* :func:`chunk_lengths` turns whole-sequence lengths into one chunk's lengths,
* :class:`Stream` wraps a layer and keeps its state between calls,
* :class:`StreamingStep` turns a layer or a cell into a module of ONE step with its
  state as plain tensor inputs and outputs, ``step(x_t, *state) -> (y_t, *new_state)``,
  to export (``torch.export``, AOTInductor, ONNX) for low-latency serving.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import shape_str

StateLike = Union[Tensor, Sequence["StateLike"], None]


def detach_state(state: StateLike) -> StateLike:
    """Detach a state from the graph: a tensor, an ``(h, c)`` tuple, or nested tuples/lists.

    Use it between chunks in truncated BPTT so gradients stop at the chunk boundary.
    """
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    raise TypeError(f"detach_state: state must be a Tensor or a tuple/list of Tensors, got {type(state).__name__}")


def reset_state(state: StateLike, mask, batch_dim: int = 1) -> StateLike:
    """Zero the state of the batch rows where ``mask`` is True; return a new state.

    Args:
        state: a tensor, an ``(h, c)`` tuple, or nested tuples. A layer's state is
            ``(D*num_layers, N, H)``, so the batch axis is 1 (the default); for a
            cell's ``(N, H)`` state pass ``batch_dim=0``.
        mask: ``(N,)`` booleans (tensor or list): True resets that row.
        batch_dim: the batch axis of every state tensor.

    Nothing is changed in place, so the state stays usable by autograd.
    """
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return type(state)(reset_state(s, mask, batch_dim) for s in state)
    if not isinstance(state, Tensor):
        raise TypeError(f"reset_state: state must be a Tensor or a tuple/list of Tensors, got {type(state).__name__}")
    m = torch.as_tensor(mask, device=state.device)
    if m.dtype != torch.bool:
        raise TypeError(f"reset_state: mask must hold booleans (True = reset that row), got dtype {m.dtype}")
    if not -state.dim() <= batch_dim < state.dim():
        raise ValueError(f"reset_state: batch_dim={batch_dim} is out of range for a state of shape "
                         f"{shape_str(state.shape)}")
    if m.dim() != 1 or m.numel() != state.shape[batch_dim]:
        raise ValueError(
            f"reset_state: mask has shape {shape_str(m.shape)} but the state of shape {shape_str(state.shape)} has "
            f"N={state.shape[batch_dim]} rows on its batch axis (batch_dim={batch_dim}); expected ({state.shape[batch_dim]},)"
        )
    shape = [1] * state.dim()
    shape[batch_dim] = -1
    return state.masked_fill(m.view(shape), 0)


def chunk_lengths(lengths, start: int, size: int) -> Tensor:
    """The lengths of each sequence inside the chunk ``[start, start + size)``.

    A sequence that ended before ``start`` gets 0 (its state passes through).
    """
    t = torch.as_tensor(lengths)
    return (t - start).clamp(min=0, max=size)


class Stream:
    """Run a one-way layer chunk by chunk, keeping its state between calls.

    >>> stream = rnnkit.Stream(rnnkit.LSTM(8, 16, batch_first=True))
    >>> y1 = stream(torch.randn(4, 10, 8))   # (4, 10, 16)
    >>> y2 = stream(torch.randn(4, 10, 8))   # continues from y1's final state
    >>> stream.detach()                      # truncated BPTT: cut the graph here
    >>> stream.reset(torch.tensor([True, False, False, True]))  # new episodes in rows 0 and 3

    Bidirectional layers cannot stream (the reverse direction needs the future).
    """

    def __init__(self, module: nn.Module, state: StateLike = None) -> None:
        if getattr(module, "bidirectional", False):
            raise ValueError(
                f"Stream: {module._describe()} is bidirectional and cannot stream: its reverse direction reads the "
                "sequence from the end. Use a one-way layer for streaming, or call it on whole sequences."
            )
        self.module = module
        self.state = state

    def __call__(self, chunk, lengths=None) -> Tensor:
        """Run one chunk; ``lengths`` are this chunk's lengths (see :func:`chunk_lengths`)."""
        out, self.state = self.module(chunk, self.state, lengths=lengths)
        return out

    def detach(self) -> None:
        """Cut the autograd graph at the current state (truncated BPTT)."""
        self.state = detach_state(self.state)

    def reset(self, mask: Optional[Union[Tensor, Sequence[bool]]] = None) -> None:
        """Forget the whole state (``mask=None``) or the rows where ``mask`` is True."""
        if mask is None or self.state is None:
            self.state = None
        else:
            self.state = reset_state(self.state, mask, batch_dim=1)


class StreamingStep(nn.Module):
    """One step of a layer or cell, state in and state out, for export and serving.

    ``step(x_t, h[, c]) -> (y_t, h'[, c'])`` takes and returns plain tensors only
    (no tuples, no ``None``), so the module exports with ``torch.export`` (then
    AOTInductor) and ``torch.onnx.export`` as is, and a server keeps the state between
    requests: feed each call's ``new_state`` into the next. Stepping it ``T`` times
    equals running the wrapped module on the whole sequence.

    Args:
        module: a one-way rnnkit layer (``rnnkit.LSTM``, any zoo layer) or cell
            (``rnnkit.LSTMCell``, any zoo cell). Its parameters are shared, not copied;
            the backend is the module's own.

    Shapes (``N`` batch; ``D * num_layers`` is ``num_layers`` since bidirectional layers
    cannot stream):

    * layer: ``x_t (N, H_in)`` (``(N, C, *S)`` for a convolutional layer), each state
      ``(num_layers, N, ...)`` as the layer's ``h_0``/``c_0``; ``y_t`` is the last layer's
      output at this step, ``(N, H_out)``.
    * cell: ``x_t (N, H_in)`` (``(N, C, *S)``), each state ``(N, ...)``; ``y_t`` is the new ``h``.

    The state tensors are named by :attr:`state_names` (``("h", "c")`` for an LSTM);
    :meth:`initial_state` gives zeros of the right shapes, :meth:`example_inputs` and
    :meth:`dynamic_shapes` what ``torch.export`` needs for a dynamic batch, and
    :attr:`input_names`, :attr:`output_names`, :meth:`dynamic_axes` what ``torch.onnx.export`` takes.

    Examples::

        >>> step = rnnkit.StreamingStep(rnnkit.LSTM(8, 16, num_layers=2).eval())
        >>> ep = torch.export.export(step, step.example_inputs(batch=2), dynamic_shapes=step.dynamic_shapes())
        >>> state = step.initial_state(batch=4)
        >>> for x_t in torch.randn(10, 4, 8):      # a stream, one step per request
        ...     y_t, *state = ep.module()(x_t, *state)
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        from .cells import CellBase
        from .layers import RecurrentBase
        if isinstance(module, RecurrentBase):
            self.is_cell = False
        elif isinstance(module, CellBase):
            self.is_cell = True
        else:
            raise TypeError(f"StreamingStep: module must be an rnnkit layer (a RecurrentBase, e.g. rnnkit.LSTM) or "
                            f"cell (e.g. rnnkit.LSTMCell), got {type(module).__name__}")
        if getattr(module, "bidirectional", False):
            raise ValueError(
                f"StreamingStep: {module._describe()} is bidirectional and cannot stream: its reverse direction reads "
                "the sequence from the end. Use a one-way layer, or export the whole layer (torch.export).")
        names = tuple(module.cell_spec.state_names)
        if names not in (("h",), ("h", "c")):
            raise ValueError(f"StreamingStep: {module._describe()} has the state ({', '.join(names)}); a streaming "
                             "step takes (h,) or (h, c)")
        self.module = module
        self.state_names: Tuple[str, ...] = names

    @property
    def batch_dim(self) -> int:
        """The batch axis of every state tensor: 1 for a layer ``(num_layers, N, ...)``, 0 for a cell ``(N, ...)``."""
        return 0 if self.is_cell else 1

    @property
    def input_names(self) -> List[str]:
        """``["x_t", "h", ...]``: the inputs' names, for ``torch.onnx.export(input_names=...)``."""
        return ["x_t", *self.state_names]

    @property
    def output_names(self) -> List[str]:
        """``["y_t", "h_out", ...]``: the outputs' names, for ``torch.onnx.export(output_names=...)``."""
        return ["y_t", *(f"{name}_out" for name in self.state_names)]

    def forward(self, x_t: Tensor, h: Tensor, c: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
        """``(y_t, h')`` or, for a module with a cell state, ``(y_t, h', c')``."""
        if (c is None) != (len(self.state_names) == 1):
            want = "x_t, h and c" if len(self.state_names) == 2 else "x_t and h only"
            raise TypeError(f"StreamingStep.forward: {self.module._describe()} takes {want} (its state is "
                            f"({', '.join(self.state_names)})), got c={'None' if c is None else 'a Tensor'}")
        hx = h if c is None else (h, c)
        if self.is_cell:
            new = self.module(x_t, hx)
            new = tuple(new) if isinstance(new, (tuple, list)) else (new,)
            return (new[0], *new)
        time_dim = 1 if self.module.batch_first else 0
        out, new = self.module(x_t.unsqueeze(time_dim), hx)
        new = tuple(new) if isinstance(new, (tuple, list)) else (new,)
        return (out.select(time_dim, 0), *new)

    def state_shapes(self, batch: int, feature_shape: Optional[Sequence[int]] = None) -> List[Tuple[int, ...]]:
        """Each state tensor's shape for a batch of ``batch`` steps whose features are
        ``feature_shape`` (``x_t.shape[1:]``; needed for convolutional modules only)."""
        m = self.module
        if feature_shape is None:
            if getattr(m, "_nd", None) is not None:
                raise ValueError(f"StreamingStep.state_shapes: {m._describe()} is convolutional: pass feature_shape "
                                 f"(C, *S), x_t's shape without the batch axis")
            feature_shape = (m.input_size,)
        feature_shape = tuple(feature_shape)
        if not self.is_cell:
            return [tuple(s) for s in m._state_shapes(batch, feature_shape)]
        if getattr(m, "_nd", None) is not None:
            from .zoo.conv import _state_spatial
            return [(batch, m.hidden_size, *_state_spatial(feature_shape[1:], m.stride)) for _ in self.state_names]
        return [(batch, size) for size in m._state_sizes()]

    def initial_state(self, batch: int = 1, feature_shape: Optional[Sequence[int]] = None) -> Tuple[Tensor, ...]:
        """Zeros for every state tensor (the module's default initial state), on its device and dtype."""
        ref = next(self.module.parameters())
        return tuple(torch.zeros(shape, dtype=ref.dtype, device=ref.device)
                     for shape in self.state_shapes(batch, feature_shape))

    def example_inputs(self, batch: int = 2, feature_shape: Optional[Sequence[int]] = None) -> Tuple[Tensor, ...]:
        """``(x_t, *state)``: random ``x_t`` and zero states, to trace or export with
        (``batch`` >= 2 so that ``torch.export`` keeps the batch axis dynamic)."""
        m = self.module
        ref = next(m.parameters())
        features = tuple(feature_shape) if feature_shape is not None else (m.input_size,)
        if getattr(m, "_nd", None) is not None and feature_shape is None:
            features = (m.input_size, *([4] * m._nd))
        x_t = torch.randn((batch, *features), dtype=ref.dtype, device=ref.device)
        return (x_t, *self.initial_state(batch, features))

    def dynamic_shapes(self, batch=None) -> Tuple[Dict[int, object], ...]:
        """``torch.export``'s ``dynamic_shapes`` for :meth:`forward`: the batch axis of ``x_t`` and
        of every state is ``batch`` (default ``torch.export.Dim("batch")``), the rest static."""
        if batch is None:
            batch = torch.export.Dim("batch")
        return ({0: batch}, *({self.batch_dim: batch} for _ in self.state_names))

    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes``: the batch axis of every input and output."""
        names = self.input_names + self.output_names
        return {name: {0 if name in ("x_t", "y_t") else self.batch_dim: "batch"} for name in names}

    def extra_repr(self) -> str:
        return f"state_names={self.state_names}"
