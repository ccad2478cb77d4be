"""The reference twin of every fused sequence op: the same signature and the same
visible results (``out`` and the final state), written with the cells' own step
functions and the reference scan, in plain PyTorch ops.

They are the oracle the op tests compare against, and the fused ops' autograd
formulas use them for what the hand-written C++ backward cannot do: a backward
that is itself differentiable (``create_graph=True``: second derivatives,
gradient penalties, ``torch.func`` transforms).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..functional import RECURRENT_MASK, gru_step, lstm_step, rnn_step
from ..runner import reference_scan
from ..spec import CellSpec

_ACTS = {0: torch.tanh, 1: torch.relu}


def _identity(x: Tensor, p) -> Tensor:
    return x


@functools.lru_cache(maxsize=None)
def _spec(name: str, states: int, step: Callable) -> CellSpec:
    return CellSpec(name, 1, ("h", "c")[:states], _identity, step)


def _scan(name: str, step: Callable, p: dict, xp: Tensor, state: Tuple[Tensor, ...],
          lengths: Optional[Tensor]) -> Tuple[Tensor, ...]:
    out, final = reference_scan(_spec(name, len(state), step), p, xp, state, lengths)
    return (out, *final)


def rnn_fwd(xp, w_hh, h0, lengths, act):
    return _scan(f"rnn_{act}", functools.partial(rnn_step, act=_ACTS[act]), {"weight_hh": w_hh}, xp, (h0,), lengths)


def lstm_fwd(xp, w_hh, w_hr, h0, c0, lengths):
    return _scan("lstm", lstm_step, {"weight_hh": w_hh, "weight_hr": w_hr}, xp, (h0, c0), lengths)


def _projected(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``x (L, N, I) -> (L, N, G)``: :func:`project_fwd` over every step."""
    return project_fwd(x.reshape(-1, x.shape[-1]), w, b)[0].view(*x.shape[:-1], w.shape[0])


def lstm_infer(x, w_ih, b, w_hh, w_hr, h0, c0, lengths):
    return lstm_fwd(_projected(x, w_ih, b), w_hh, w_hr, h0, c0, lengths)


def _regularized(step: Callable, p: dict, xp: Tensor, state: Tuple[Tensor, ...], lengths: Optional[Tensor],
                 rd_mask: Optional[Tensor], zo_masks, zo_rates) -> Tuple[Tensor, ...]:
    """A cell's step loop with the runner's regularizers as :func:`rnnkit.runner.apply_regularizers`
    applies them, on given masks: ``rd_mask`` in the recurrent product (under
    :data:`rnnkit.functional.RECURRENT_MASK`), zoneout ``k s_{t-1} + (1 - k) s_t`` per state with
    ``zo_masks[j][t]`` (or the constant ``zo_rates[j]`` where a mask is None), rows past their length held."""
    if rd_mask is not None:
        p = {**p, RECURRENT_MASK: rd_mask}

    def mix(prev, new, masks, rate, t):
        if masks is not None:
            return masks[t] * prev + (1 - masks[t]) * new
        return rate * prev + (1 - rate) * new if rate > 0 else new

    outputs = []
    for t, xp_t in enumerate(xp.unbind(0)):
        new = step(xp_t, state, p)
        new = tuple(mix(s, n, m, r, t) for s, n, m, r in zip(state, new, zo_masks, zo_rates))
        if lengths is not None:
            keep = (t < lengths).unsqueeze(1)
            new = tuple(torch.where(keep, n, s) for n, s in zip(new, state))
        state = new
        outputs.append(state[0])
    h0 = state[0]
    out = torch.stack(outputs) if outputs else xp.new_empty(0, h0.shape[0], h0.shape[1])
    return (out, *state)


def lstm_reg_fwd(xp, w_hh, w_hr, h0, c0, lengths, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate):
    """The LSTM step loop of the reference scan with the runner's regularizers (:func:`_regularized`)."""
    return _regularized(lstm_step, {"weight_hh": w_hh, "weight_hr": w_hr}, xp, (h0, c0), lengths, rd_mask,
                        (zo_h, zo_c), (zo_h_rate, zo_c_rate))


def gru_infer(x, w_ih, b_ih, w_hh, b_hh, h0, lengths):
    return gru_fwd(_projected(x, w_ih, b_ih), w_hh, b_hh, h0, lengths)


def gru_reg_fwd(xp, w_hh, b_hh, h0, lengths, rd_mask, zo_h, zo_h_rate):
    """The GRU step loop with the runner's regularizers on given masks (:func:`_regularized`)."""
    return _regularized(gru_step, {"weight_hh": w_hh, "bias_hh": b_hh}, xp, (h0,), lengths, rd_mask, (zo_h,),
                        (zo_h_rate,))


def gru_fwd(xp, w_hh, b_hh, h0, lengths):
    return _scan("gru", gru_step, {"weight_hh": w_hh, "bias_hh": b_hh}, xp, (h0,), lengths)


def peephole_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths):
    from ..zoo.peephole import peephole_lstm_step
    p = {"weight_hh": w_hh, "weight_ci": w_ci, "weight_cf": w_cf, "weight_co": w_co}
    return _scan("peephole_lstm", peephole_lstm_step, p, xp, (h0, c0), lengths)


def ln_lstm_fwd(xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps):
    from ..zoo.layernorm import layernorm_lstm_step
    p = {"weight_hh": w_hh, "ln_weight_hh": ln_w_hh, "ln_weight_c": ln_w_c, "ln_bias_c": ln_b_c}
    return _scan(f"ln_lstm_{eps}", functools.partial(layernorm_lstm_step, eps=eps), p, xp, (h0, c0), lengths)


def ln_gru_fwd(xp, w_hh, ln_w_hh, shift, h0, lengths, eps):
    from ..zoo.layernorm import layernorm_gru_step
    p = {"weight_hh": w_hh, "ln_weight_hh": ln_w_hh, "ln_bias_hh": shift}
    return _scan(f"ln_gru_{eps}", functools.partial(layernorm_gru_step, eps=eps), p, xp, (h0,), lengths)


def peephole_reg_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, rd_mask, zo_h, zo_c, zo_h_rate, zo_c_rate):
    from ..zoo.peephole import peephole_lstm_step
    p = {"weight_hh": w_hh, "weight_ci": w_ci, "weight_cf": w_cf, "weight_co": w_co}
    return _regularized(peephole_lstm_step, p, xp, (h0, c0), lengths, rd_mask, (zo_h, zo_c), (zo_h_rate, zo_c_rate))


def ln_lstm_reg_fwd(xp, w_hh, ln_w_hh, ln_w_c, ln_b_c, h0, c0, lengths, eps, rd_mask, zo_h, zo_c, zo_h_rate,
                    zo_c_rate):
    from ..zoo.layernorm import layernorm_lstm_step
    p = {"weight_hh": w_hh, "ln_weight_hh": ln_w_hh, "ln_weight_c": ln_w_c, "ln_bias_c": ln_b_c}
    return _regularized(functools.partial(layernorm_lstm_step, eps=eps), p, xp, (h0, c0), lengths, rd_mask,
                        (zo_h, zo_c), (zo_h_rate, zo_c_rate))


def ln_gru_reg_fwd(xp, w_hh, ln_w_hh, shift, h0, lengths, eps, rd_mask, zo_h, zo_h_rate):
    from ..zoo.layernorm import layernorm_gru_step
    p = {"weight_hh": w_hh, "ln_weight_hh": ln_w_hh, "ln_bias_hh": shift}
    return _regularized(functools.partial(layernorm_gru_step, eps=eps), p, xp, (h0,), lengths, rd_mask, (zo_h,),
                        (zo_h_rate,))


def indrnn_fwd(xp, u, h0, lengths, act):
    from ..zoo.indrnn import indrnn_step
    return _scan(f"indrnn_{act}", functools.partial(indrnn_step, act=_ACTS[act]), {"weight_hh": u}, xp, (h0,),
                 lengths)


def min_gru_fwd(xp, h0, lengths):
    from ..zoo.minimal import min_gru_step
    return _scan("min_gru", min_gru_step, {}, xp, (h0,), lengths)


def min_lstm_fwd(xp, h0, lengths):
    from ..zoo.minimal import min_lstm_step
    return _scan("min_lstm", min_lstm_step, {}, xp, (h0,), lengths)


def conv_lstm_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths):
    from ..zoo.conv import conv_lstm_step
    p = {"weight_hh": w_hh, "weight_ci": w_ci, "weight_cf": w_cf, "weight_co": w_co}
    return _scan("conv_lstm", conv_lstm_step, p, xp, (h0, c0), lengths)


def conv_gru_fwd(xp, w_hh, b_hh, h0, lengths):
    from ..zoo.conv import conv_gru_step
    return _scan("conv_gru", conv_gru_step, {"weight_hh": w_hh, "bias_hh": b_hh}, xp, (h0,), lengths)


def project_fwd(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tuple[Tensor]:
    return (torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t()),)


TWINS: Dict[str, Callable[..., Tuple[Tensor, ...]]] = {
    "rnn_fwd": rnn_fwd, "lstm_fwd": lstm_fwd, "gru_fwd": gru_fwd, "peephole_fwd": peephole_fwd,
    "ln_lstm_fwd": ln_lstm_fwd, "ln_gru_fwd": ln_gru_fwd, "indrnn_fwd": indrnn_fwd,
    "conv_lstm_fwd": conv_lstm_fwd, "conv_gru_fwd": conv_gru_fwd, "project_fwd": project_fwd,
    "lstm_reg_fwd": lstm_reg_fwd, "gru_reg_fwd": gru_reg_fwd, "peephole_reg_fwd": peephole_reg_fwd,
    "ln_lstm_reg_fwd": ln_lstm_reg_fwd, "ln_gru_reg_fwd": ln_gru_reg_fwd,
}
"""Each fused ``*_fwd`` op's twin: same arguments, returns ``(out, h_n)`` or ``(out, h_n, c_n)``
(the op's first two or three results; the rest are what its C++ backward reads)."""
