"""The cell zoo: recurrent variants torch.nn lacks, each a step function and a
:class:`~rnnkit.CellSpec` run by the shared sequence runner. Importing this
package registers every layer in :data:`rnnkit.LAYERS`."""

from .layernorm import LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell
from .peephole import PeepholeLSTM, PeepholeLSTMCell
from .indrnn import IndRNN, IndRNNCell
from .conv import (ConvGRU, ConvGRU1d, ConvGRU1dCell, ConvGRU2d, ConvGRU2dCell, ConvGRU3d, ConvGRU3dCell, ConvGRUCell,
                   ConvLSTM, ConvLSTM1d, ConvLSTM1dCell, ConvLSTM2d, ConvLSTM2dCell, ConvLSTM3d, ConvLSTM3dCell,
                   ConvLSTMCell)
from .minimal import MinGRU, MinGRUCell, MinLSTM, MinLSTMCell
