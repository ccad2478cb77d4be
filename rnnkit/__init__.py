"""rnnkit: recurrent neural networks for PyTorch.

Drop-in ``torch.nn`` layers and cells (:class:`RNN`, :class:`LSTM`, :class:`GRU`,
:class:`RNNCell`, :class:`LSTMCell`, :class:`GRUCell`) on one sequence runner
with swappable backends, and the variants torch.nn lacks (the zoo).
"""

import torch as _torch

from .backends import BACKENDS, describe_backends
from . import fused as _fused  # registers the 'fused' backend (the C++ build waits for first use)
from . import triton as _triton  # registers the 'triton' backend (triton is imported when a kernel first runs)
from .cells import GRUCell, LSTMCell, RNNCell
from .convert import to_torch_nn
from .errors import RNNDeviceError, RNNInputError, RNNShapeError, RNNTypeError
from .explain import Explanation, explain
from .layers import GRU, LSTM, RNN, RecurrentBase
from .registry import LAYERS, LayerEntry, get_layer, register_layer
from .saving import safe_globals
from .sequences import (lengths_to_mask, pack_padded_sequence, pack_sequence, pad_packed_sequence, pad_sequence,
                        unpad_sequence)
from .spec import CellSpec
from .streaming import Stream, StreamingStep, chunk_lengths, detach_state, reset_state

register_layer(LayerEntry("rnn", RNN, RNNCell, torch_equivalent=_torch.nn.RNN))
register_layer(LayerEntry("lstm", LSTM, LSTMCell, torch_equivalent=_torch.nn.LSTM))
register_layer(LayerEntry("gru", GRU, GRUCell, torch_equivalent=_torch.nn.GRU))

# the zoo registers its layers on import, after the standard ones
from .zoo import (ConvGRU, ConvGRU1d, ConvGRU1dCell, ConvGRU2d, ConvGRU2dCell, ConvGRU3d,  # noqa: E402
                  ConvGRU3dCell, ConvGRUCell, ConvLSTM, ConvLSTM1d, ConvLSTM1dCell, ConvLSTM2d, ConvLSTM2dCell,
                  ConvLSTM3d, ConvLSTM3dCell, ConvLSTMCell, IndRNN, IndRNNCell, LayerNormGRU, LayerNormGRUCell,
                  LayerNormLSTM, LayerNormLSTMCell, MinGRU, MinGRUCell, MinLSTM, MinLSTMCell, PeepholeLSTM,
                  PeepholeLSTMCell)

__version__ = "0.1.0"

__all__ = [
    "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "RecurrentBase", "CellSpec",
    "explain", "Explanation", "Stream", "StreamingStep", "chunk_lengths", "detach_state", "reset_state",
    "lengths_to_mask", "pack_padded_sequence", "pack_sequence", "pad_packed_sequence", "pad_sequence", "unpad_sequence",
    "LayerNormLSTM", "LayerNormGRU", "PeepholeLSTM", "IndRNN",
    "LayerNormLSTMCell", "LayerNormGRUCell", "PeepholeLSTMCell", "IndRNNCell",
    "ConvLSTM", "ConvLSTM1d", "ConvLSTM2d", "ConvLSTM3d", "ConvGRU", "ConvGRU1d", "ConvGRU2d", "ConvGRU3d",
    "ConvLSTMCell", "ConvLSTM1dCell", "ConvLSTM2dCell", "ConvLSTM3dCell",
    "ConvGRUCell", "ConvGRU1dCell", "ConvGRU2dCell", "ConvGRU3dCell",
    "MinGRU", "MinLSTM", "MinGRUCell", "MinLSTMCell",
    "RNNInputError", "RNNShapeError", "RNNDeviceError", "RNNTypeError",
    "to_torch_nn", "BACKENDS", "describe_backends", "LAYERS", "LayerEntry", "get_layer", "register_layer",
    "safe_globals", "__version__",
]
