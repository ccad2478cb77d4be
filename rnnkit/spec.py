"""What the sequence runner needs to know about a recurrent cell.

A cell is data (FlashRNN's idea): a :class:`CellSpec` names the cell, its gate
count, its state layout and two pure functions. Everything else (the time loop,
the reverse direction, layers, lengths, dropout) is the runner's job.

Shape legend, used by every docstring and comment in rnnkit:

* ``L`` sequence length, ``N`` batch size, ``D`` directions (1 or 2),
* ``H_in`` input features, ``H`` hidden size, ``H_out`` output size
  (``proj_size`` if the LSTM projects, else ``H``), ``G`` gates * ``H``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Tuple

from torch import Tensor

Params = Mapping[str, Optional[Tensor]]
"""One layer-direction's parameters, by their name without the ``_l{k}`` suffix."""

State = Tuple[Tensor, ...]
"""A cell's state: ``(h,)`` or ``(h, c)``; ``state[0]`` is always the output."""


@dataclass(frozen=True)
class CellSpec:
    """One recurrent cell, described for the sequence runner.

    Attributes:
        name: the stem that names the cell everywhere (``"lstm"``, ``"gru"``...).
        gates: how many ``H``-sized blocks the projections produce (4 for LSTM).
        state_names: names of the state tensors; the first is the output ``h``.
        project: ``(x, p) -> xp``, the input projection. ``x`` may carry any
            leading axes (a whole ``(L, N, H_in)`` sequence or one ``(N, H_in)``
            step), so the runner projects all steps in one matrix product.
        step: ``(xp_t, state, p) -> state``, one time step on a projected input.
        fusable: names a pointwise kernel family of the ``fused`` backend, or
            None if only the generic backends can run this cell.
        sequence: optional ``(xp, state, p, lengths) -> (outputs, state)`` that
            runs a whole sequence at once (a parallel scan, for cells whose gates
            do not read ``h``); it must equal looping ``step``, which the
            reference scan uses when ``sequence`` is None.
        extra: free-form facts other parts read (``torch_mode``: the name of
            PyTorch's fused op for this cell, if it has one).
    """

    name: str
    gates: int
    state_names: Tuple[str, ...]
    project: Callable[[Tensor, Params], Tensor]
    step: Callable[[Tensor, State, Params], State]
    fusable: Optional[str] = None
    sequence: Optional[Callable[..., Tuple[Tensor, State]]] = None
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def num_states(self) -> int:
        return len(self.state_names)
