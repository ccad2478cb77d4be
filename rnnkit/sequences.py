"""Padding and packing utilities, none of which changes its input.

``pad_sequence``, ``pack_padded_sequence``, ``pad_packed_sequence`` and
``pack_sequence`` are torch's (they do not mutate). :func:`unpad_sequence`
replaces torch's, which transposes the caller's tensor in place when
``batch_first=False``. :func:`lengths_to_mask` is new.

With rnnkit layers you rarely need packing at all: pass ``lengths=`` to the
layer instead.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence, pad_sequence

from ._checks import shape_str

__all__ = ["pad_sequence", "pack_padded_sequence", "pad_packed_sequence", "pack_sequence", "unpad_sequence",
           "lengths_to_mask"]


def _lengths_tensor(lengths, where: str) -> Tensor:
    t = torch.as_tensor(lengths)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{where}: lengths must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{where}: lengths must be 1-D (N,), got shape {shape_str(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{where}: lengths must be >= 0, got {int(t.min())}")
    return t


def lengths_to_mask(lengths, max_len: Optional[int] = None, batch_first: bool = False) -> Tensor:
    """Boolean mask, True at valid steps: ``(L, N)``, or ``(N, L)`` with ``batch_first``.

    ``L`` is ``max_len`` if given, else ``max(lengths)``; the mask lives on the
    device of ``lengths``.

    >>> rnnkit.lengths_to_mask(torch.tensor([2, 0, 3]), batch_first=True)
    tensor([[ True,  True, False],
            [False, False, False],
            [ True,  True,  True]])
    """
    t = _lengths_tensor(lengths, "lengths_to_mask")
    longest = int(t.max()) if t.numel() else 0
    if max_len is None:
        max_len = longest
    elif max_len < longest:
        raise ValueError(f"lengths_to_mask: max_len={max_len} is shorter than the longest length {longest}")
    mask = torch.arange(max_len, device=t.device).unsqueeze(0) < t.unsqueeze(1)  # (N, L)
    return mask if batch_first else mask.t()


def unpad_sequence(padded_sequences: Tensor, lengths, batch_first: bool = False) -> List[Tensor]:
    """Split a padded batch into its sequences, each ``(lengths[n], *)``.

    Unlike ``torch.nn.utils.rnn.unpad_sequence``, the input is never modified.
    """
    if not isinstance(padded_sequences, Tensor) or padded_sequences.dim() < 2:
        got = shape_str(padded_sequences.shape) if isinstance(padded_sequences, Tensor) else type(padded_sequences).__name__
        raise ValueError(f"unpad_sequence: padded_sequences must be at least 2-D (L, N, *) or (N, L, *), got {got}")
    t = _lengths_tensor(lengths, "unpad_sequence")
    batch = padded_sequences if batch_first else padded_sequences.transpose(0, 1)  # a view, not in place
    if t.numel() != batch.shape[0]:
        raise ValueError(f"unpad_sequence: lengths has {t.numel()} entries but the batch has N={batch.shape[0]}")
    if t.numel() and int(t.max()) > batch.shape[1]:
        raise ValueError(f"unpad_sequence: lengths has {int(t.max())} but L={batch.shape[1]}")
    return [batch[n, : int(length)] for n, length in enumerate(t)]
