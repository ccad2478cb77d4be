"""The cell zoo: recurrent variants torch.nn lacks, each a step function and a
:class:`~rnnkit.CellSpec` run by the shared sequence runner. Importing this
package registers every layer in :data:`rnnkit.LAYERS`."""

from .layernorm import LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell
from .peephole import PeepholeLSTM, PeepholeLSTMCell
from .indrnn import IndRNN, IndRNNCell
