"""LayerNorm LSTM and GRU on the LSTM and GRU kernels with ``LN``: the recurrent product is
normalized over its whole ``G`` row inside the kernel (one program holds whole rows, in both
drivers), the LSTM also normalizes ``c_t`` before the output ``tanh``. The input side
(``LN_ih(W_ih x) + b_ih``) runs over all steps at once with ATen, as the fused backend does;
``b_hh + ln_bias_hh`` joins ``xp`` (LSTM) or stays in the kernel as the shift (GRU: ``r`` gates it)."""

from typing import Optional

from torch import Tensor

from .gru import gru_sequence
from .lstm import lstm_sequence


def _shift(p) -> Optional[Tensor]:
    parts = [p[name] for name in ("bias_hh", "ln_bias_hh") if p.get(name) is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def scan_layernorm_lstm(spec, p, x: Tensor, state, lengths: Optional[Tensor]):
    eps = spec.project.keywords["eps"]
    xp = spec.project(x, p)
    shift = _shift(p)
    if shift is not None:
        xp = xp + shift
    ln_b_c = p.get("ln_bias_c")
    if ln_b_c is None:
        ln_b_c = p["ln_weight_c"].new_zeros(p["ln_weight_c"].shape)
    out, h_n, c_n = lstm_sequence(xp, p["weight_hh"], state[0], state[1], lengths,
                                  ln=(p["ln_weight_hh"], p["ln_weight_c"], ln_b_c), eps=eps)
    return out, (h_n, c_n)


def scan_layernorm_gru(spec, p, x: Tensor, state, lengths: Optional[Tensor]):
    eps = spec.project.keywords["eps"]
    xp = spec.project(x, p)
    out, h_n = gru_sequence(xp, p["weight_hh"], _shift(p), state[0], lengths, ln_w_hh=p["ln_weight_hh"], eps=eps)
    return out, (h_n,)
