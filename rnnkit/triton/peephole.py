"""PeepholeLSTM on the LSTM kernels (rnnkit/triton/lstm.py) with ``PEEP``: ``i, f`` see ``c_{t-1}``
through ``w_ci, w_cf``, ``o`` sees ``c_t`` through ``w_co``; their gradients are reduced over all
steps from the saved gate gradients and cell states."""

from typing import Optional

from torch import Tensor

from . import _common as C
from .lstm import lstm_sequence


def scan_peephole_lstm(spec, p, x: Tensor, state, lengths: Optional[Tensor]):
    xp = C.project(x, p["weight_ih"], C.bias_sum(p))
    out, h_n, c_n = lstm_sequence(xp, p["weight_hh"], state[0], state[1], lengths,
                                  peepholes=(p["weight_ci"], p["weight_cf"], p["weight_co"]))
    return out, (h_n, c_n)
