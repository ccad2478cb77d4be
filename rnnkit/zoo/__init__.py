from .conv import (ConvGRU, ConvGRU1d, ConvGRU1dCell, ConvGRU2d, ConvGRU2dCell, ConvGRU3d, ConvGRU3dCell, ConvGRUCell,
                   ConvLSTM, ConvLSTM1d, ConvLSTM1dCell, ConvLSTM2d, ConvLSTM2dCell, ConvLSTM3d, ConvLSTM3dCell,
                   ConvLSTMCell)
from .minimal import MinGRU, MinGRUCell, MinLSTM, MinLSTMCell
