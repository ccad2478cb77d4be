"""The registry of layers: the tests, the benchmark, `rnnkit explain` and
`rnnkit demo --cell` all walk this one table, so a new cell that registers
here is tested, benchmarked and explained with no extra code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class LayerEntry:
    """One registered layer.

    Attributes:
        name: the stem used on the command line and in tables (``"lstm"``).
        layer: the layer class (a :class:`rnnkit.RecurrentBase`).
        cell: its one-step cell class, if it has one.
        kwargs: constructor keywords every generic user should pass
            (e.g. ``{"kernel_size": 3}`` for a ConvLSTM).
        spatial: for convolutional layers, a small spatial size to build example
            inputs ``(L, N, C, *spatial)``; None for vector inputs ``(L, N, H_in)``.
        torch_equivalent: the torch.nn class computing the same function, if any.
    """

    name: str
    layer: type
    cell: Optional[type] = None
    kwargs: Mapping[str, object] = field(default_factory=dict)
    spatial: Optional[Tuple[int, ...]] = None
    torch_equivalent: Optional[type] = None

    def make(self, input_size: int, hidden_size: int, **kwargs):
        return self.layer(input_size, hidden_size, **{**self.kwargs, **kwargs})

    def input_shape(self, seq_len: int, batch: int, input_size: int, batch_first: bool = False):
        lead = (batch, seq_len) if batch_first else (seq_len, batch)
        return lead + (input_size,) + tuple(self.spatial or ())


LAYERS: Dict[str, LayerEntry] = {}


def register_layer(entry: LayerEntry) -> LayerEntry:
    """Add a layer to :data:`LAYERS` (the tests, benchmarks, ``explain`` and the CLI walk it); returns ``entry``."""
    LAYERS[entry.name] = entry
    return entry


def get_layer(name: str) -> LayerEntry:
    """The registered layer called ``name`` (any case, ``-`` for ``_``); a ValueError lists the names."""
    key = name.lower().replace("-", "_")
    if key not in LAYERS:
        raise ValueError(f"unknown layer {name!r}; choose from {sorted(LAYERS)}")
    return LAYERS[key]
