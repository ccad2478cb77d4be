"""rnnkit: recurrent neural networks for PyTorch.

Drop-in ``torch.nn`` layers and cells (:class:`RNN`, :class:`LSTM`, :class:`GRU`,
:class:`RNNCell`, :class:`LSTMCell`, :class:`GRUCell`) on one sequence runner
with swappable backends.
"""

from .backends import BACKENDS, describe_backends
from .cells import GRUCell, LSTMCell, RNNCell
from .layers import GRU, LSTM, RNN, RecurrentBase
from .registry import LAYERS, LayerEntry, get_layer, register_layer
from .spec import CellSpec
from .zoo.conv import (ConvGRU, ConvGRU1d, ConvGRU1dCell, ConvGRU2d, ConvGRU2dCell, ConvGRU3d, ConvGRU3dCell,
                       ConvGRUCell, ConvLSTM, ConvLSTM1d, ConvLSTM1dCell, ConvLSTM2d, ConvLSTM2dCell, ConvLSTM3d,
                       ConvLSTM3dCell, ConvLSTMCell)
from .zoo.minimal import MinGRU, MinGRUCell, MinLSTM, MinLSTMCell

import torch as _torch

register_layer(LayerEntry("rnn", RNN, RNNCell, torch_equivalent=_torch.nn.RNN))
register_layer(LayerEntry("lstm", LSTM, LSTMCell, torch_equivalent=_torch.nn.LSTM))
register_layer(LayerEntry("gru", GRU, GRUCell, torch_equivalent=_torch.nn.GRU))

__version__ = "0.1.0"

__all__ = [
    "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "RecurrentBase", "CellSpec",
    "BACKENDS", "describe_backends", "LAYERS", "LayerEntry", "get_layer", "register_layer", "__version__",
]
