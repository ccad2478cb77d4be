"""rnnkit: recurrent neural networks for PyTorch.

Drop-in ``torch.nn`` layers and cells (:class:`RNN`, :class:`LSTM`, :class:`GRU`,
:class:`RNNCell`, :class:`LSTMCell`, :class:`GRUCell`) on one sequence runner
with swappable backends.
"""

from .backends import BACKENDS, describe_backends
from .cells import GRUCell, LSTMCell, RNNCell
from .layers import GRU, LSTM, RNN, RecurrentBase
from .spec import CellSpec

__version__ = "0.1.0"

__all__ = [
    "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "RecurrentBase", "CellSpec",
    "BACKENDS", "describe_backends", "__version__",
]
