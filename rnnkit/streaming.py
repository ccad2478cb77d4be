"""Streaming: feed a sequence chunk by chunk and carry the state.

Every rnnkit layer streams by construction: passing each call's returned state
into the next call gives the same outputs and final state as one call on the
whole sequence. These helpers cover what a streaming user needs around that:

* :func:`detach_state` cuts the graph for truncated backpropagation through time,
* :func:`reset_state` zeroes the state of chosen batch rows (episode or
  utterance boundaries),
* :func:`chunk_lengths` turns whole-sequence lengths into one chunk's lengths,
* :class:`Stream` wraps a layer and keeps its state between calls.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

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
