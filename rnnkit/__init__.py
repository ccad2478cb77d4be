"""rnnkit: recurrent neural networks for PyTorch.

Drop-in ``torch.nn`` layers and cells (:class:`RNN`, :class:`LSTM`, :class:`GRU`,
:class:`RNNCell`, :class:`LSTMCell`, :class:`GRUCell`) on one sequence runner
with swappable backends.
"""

from .backends import BACKENDS, describe_backends
from . import fused as _fused  # registers the 'fused' backend (the C++ build waits for first use)
from .cells import GRUCell, LSTMCell, RNNCell
from .layers import GRU, LSTM, RNN, RecurrentBase
from .registry import LAYERS, LayerEntry, get_layer, register_layer
from .spec import CellSpec

import torch as _torch

register_layer(LayerEntry("rnn", RNN, RNNCell, torch_equivalent=_torch.nn.RNN))
register_layer(LayerEntry("lstm", LSTM, LSTMCell, torch_equivalent=_torch.nn.LSTM))
register_layer(LayerEntry("gru", GRU, GRUCell, torch_equivalent=_torch.nn.GRU))

__version__ = "0.1.0"

__all__ = [
    "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "RecurrentBase", "CellSpec",
    "BACKENDS", "describe_backends", "LAYERS", "LayerEntry", "get_layer", "register_layer", "__version__",
]
