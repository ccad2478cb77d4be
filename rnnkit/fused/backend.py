"""The ``fused`` backend: rnnkit's C++ sequence kernels plugged into the runner.

Each layer-direction is one scan: the input projection of every step in one
matrix product (ATen, so autograd covers ``W_ih``, ``b_ih`` and ``x``), then one
fused op for the time loop with a hand-written backward. Layers, directions,
``lengths`` and dropout stay the runner's job (:func:`rnnkit.runner.run_stack`).

Kernel families are keyed by :attr:`rnnkit.spec.CellSpec.fusable`; a cell whose
family is not in :data:`KERNELS` is declined with a reason, so ``auto`` moves on.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .._checks import kernel_mode_reason
from ..backends import Backend
from .. import runner
from ..functional import RECURRENT_MASK
from ..runner import run_stack
from ..spec import CellSpec, Params, State
from . import _build, _ops

TABLE_PATH = Path(__file__).with_name("auto_table.json")
SIZE_CLASSES = {"S": (1, 64), "M": (16, 128), "L": (64, 256)}  # (batch, hidden) of the benchmark's sizes


def _bias_sum(p: Params) -> Optional[Tensor]:
    b_ih, b_hh = p.get("bias_ih"), p.get("bias_hh")
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def _project(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``x (L, N, H_in) -> (L, N, G)`` in one GEMM. A small one (and its backward) goes through the
    ``project_fwd`` op, which runs ATen's products on the calling thread (threading by work: under
    load a parallel region for tiny work waits a scheduler time slice at its join), and so does any
    while the machine is oversubscribed (``_ops.oversubscribed()``); the rest, and
    anything autocast, a tracer or torch.compile should see as ATen's, stays ``addmm``."""
    L, N = x.shape[0], x.shape[1]
    x2 = x.reshape(L * N, x.shape[2])
    if _serial_projection(x2, w, b):
        xp = _ops.project(x2, w, b)
    else:
        xp = torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
    return xp.view(L, N, w.shape[0])


def _serial_projection(x2: Tensor, w: Tensor, b: Optional[Tensor]) -> bool:
    # a larger projection too while the machine is oversubscribed (the op then runs the whole call on
    # one thread, csrc/common.h "under load"); asked last, only when everything else allows the op.
    # Never under export or with symbolic sizes: comparing them would add a guard on the batch.
    return (x2.dtype == w.dtype and (b is None or b.dtype == w.dtype) and _build.load() is None
            and _plain_eager(x2, w) and all(type(n) is int for n in (*x2.shape, *w.shape))
            and (x2.shape[0] * w.shape[0] * x2.shape[1] < _ops.SERIAL_PROJECT_MACS or _ops.oversubscribed()))


def _plain_eager(*tensors: Tensor) -> bool:
    """Plain tensors (no subclass) in plain eager mode: nothing that should see an op's ATen parts as its
    own (autocast, a tracer, torch.compile, export) is active, so a fused op may stand in for them."""
    return not torch.is_autocast_enabled("cpu") and _ops.plain_eager(tensors)


def _inference(x: Tensor, p: Params, state: State) -> bool:
    """Whether this call may run ``lstm_infer`` / ``gru_infer``: no gradient is needed, float32/float64
    plain tensors of one dtype, and nothing that should see the op's ATen parts as its own (autocast,
    a tracer, torch.compile or export keep ``lstm_fwd``, whose projection is ``addmm``)."""
    tensors = [x, *state, *(t for t in p.values() if isinstance(t, Tensor))]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return (x.dtype in (torch.float32, torch.float64) and all(t.dtype == x.dtype for t in tensors)
            and _plain_eager(*tensors))


def _lengths(lengths: Optional[Tensor]) -> Optional[Tensor]:
    return None if lengths is None else lengths.to(device="cpu", dtype=torch.int64)


def scan_rnn(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    xp = _project(x, p["weight_ih"], _bias_sum(p))
    out, h_n = _ops.rnn_sequence(xp, p["weight_hh"], state[0].contiguous(), _lengths(lengths), _ops.ACT[spec.fusable])
    return out, (h_n,)


def scan_lstm(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    if _inference(x, p, state):
        out, h_n, c_n = _ops.lstm_infer(x, p["weight_ih"], _bias_sum(p), p["weight_hh"], p.get("weight_hr"),
                                        state[0].contiguous(), state[1].contiguous(), _lengths(lengths))
        return out, (h_n, c_n)
    xp = _project(x, p["weight_ih"], _bias_sum(p))
    out, h_n, c_n = _ops.lstm_sequence(xp, p["weight_hh"], p.get("weight_hr"), state[0].contiguous(),
                                       state[1].contiguous(), _lengths(lengths))
    return out, (h_n, c_n)


def scan_lstm_regularized(spec: CellSpec, p: Params, x: Tensor, state: State,
                          lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """The LSTM with the runner's zoneout and recurrent dropout inside the C++ time loop. The
    recurrent-dropout mask and the zoneout masks ``(L, N, ...)`` are the ones
    :func:`rnnkit.runner.apply_regularizers` drew into ``p``, which the reference backend's wrapped
    step reads row by row (so a seed, or a patched ``bernoulli_mask``, gives both backends the same
    masks); in eval the op takes the rates."""
    applied = spec.extra[runner.REGULARIZED]
    xp = _project(x, p["weight_ih"], _bias_sum(p))
    h0, c0 = state[0].contiguous(), state[1].contiguous()
    masks, scalars = _zoneout_masks(applied, p, ("h", "c"))
    rd = p.get(RECURRENT_MASK)
    out, h_n, c_n = _ops.lstm_reg_sequence(xp, p["weight_hh"], p.get("weight_hr"), h0, c0, _lengths(lengths),
                                           None if rd is None else rd.contiguous(), masks[0], masks[1], *scalars)
    return out, (h_n, c_n)


def _zoneout_masks(applied, p: Params, names):
    """Per state: its zoneout masks ``(L, N, ...)`` (training: the ones
    :func:`rnnkit.runner.apply_regularizers` drew into ``p``) or None, and the constant rates (eval)
    or 0."""
    rates = tuple(applied.zoneout) + (0.0,) * (len(names) - len(applied.zoneout))
    if not applied.training:
        return [None] * len(names), [float(r) for r in rates]
    return [p.get(runner.zoneout_mask_key(name)) for name in names], [0.0] * len(names)


def scan_gru_regularized(spec: CellSpec, p: Params, x: Tensor, state: State,
                         lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """The GRU with the runner's zoneout and recurrent dropout inside the C++ time loop (as
    :func:`scan_lstm_regularized`)."""
    applied = spec.extra[runner.REGULARIZED]
    xp = _project(x, p["weight_ih"], p.get("bias_ih"))
    h0 = state[0].contiguous()
    masks, scalars = _zoneout_masks(applied, p, ("h",))
    rd = p.get(RECURRENT_MASK)
    out, h_n = _ops.gru_reg_sequence(xp, p["weight_hh"], p.get("bias_hh"), h0, _lengths(lengths),
                                     None if rd is None else rd.contiguous(), masks[0], scalars[0])
    return out, (h_n,)


def scan_gru(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    if _inference(x, p, state):
        out, h_n = _ops.gru_infer(x, p["weight_ih"], p.get("bias_ih"), p["weight_hh"], p.get("bias_hh"),
                                  state[0].contiguous(), _lengths(lengths))
        return out, (h_n,)
    xp = _project(x, p["weight_ih"], p.get("bias_ih"))
    out, h_n = _ops.gru_sequence(xp, p["weight_hh"], p.get("bias_hh"), state[0].contiguous(), _lengths(lengths))
    return out, (h_n,)


def _regularizer_args(spec: CellSpec, p: Params, names) -> list:
    """The regularizer arguments of a family's ``*_reg_fwd`` op for a regularized spec (see
    :func:`scan_lstm_regularized`): the recurrent-dropout mask, then per state its zoneout masks, then per
    state its constant rate; None for an unregularized spec."""
    applied = spec.extra.get(runner.REGULARIZED)
    if applied is None:
        return None
    masks, scalars = _zoneout_masks(applied, p, names)
    rd = p.get(RECURRENT_MASK)
    return [None if rd is None else rd.contiguous(), *masks, *scalars]


def scan_peephole_lstm(spec: CellSpec, p: Params, x: Tensor, state: State,
                       lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    xp = _project(x, p["weight_ih"], _bias_sum(p))
    args = (xp, p["weight_hh"], p["weight_ci"], p["weight_cf"], p["weight_co"], state[0].contiguous(),
            state[1].contiguous(), _lengths(lengths))
    reg = _regularizer_args(spec, p, ("h", "c"))
    out, h_n, c_n = _ops.peephole_sequence(*args) if reg is None else _ops.peephole_reg_sequence(*args, *reg)
    return out, (h_n, c_n)


def _ln_hh_shift(p: Params) -> Optional[Tensor]:
    """``b_hh + ln_bias_hh`` of a LayerNorm layer (either may be absent), or None: the
    part of the recurrent term that does not depend on ``h``."""
    parts = [p[name] for name in ("bias_hh", "ln_bias_hh") if p.get(name) is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def scan_layernorm_lstm(spec: CellSpec, p: Params, x: Tensor, state: State,
                        lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    # the spec's own project (LN_ih(W_ih x) + b_ih over every step, ATen), then every other term that does not
    # depend on h (b_hh, the LN_hh shift) folded in; autograd covers them all
    eps = spec.project.keywords["eps"]
    xp = spec.project(x, p)
    shift = _ln_hh_shift(p)
    if shift is not None:
        xp = xp + shift
    ln_b_c = p.get("ln_bias_c")
    if ln_b_c is None:
        ln_b_c = p["ln_weight_c"].new_zeros(p["ln_weight_c"].shape)
    args = (xp, p["weight_hh"], p["ln_weight_hh"], p["ln_weight_c"], ln_b_c, state[0].contiguous(),
            state[1].contiguous(), _lengths(lengths), eps)
    reg = _regularizer_args(spec, p, ("h", "c"))
    out, h_n, c_n = _ops.ln_lstm_sequence(*args) if reg is None else _ops.ln_lstm_reg_sequence(*args, *reg)
    return out, (h_n, c_n)


def scan_layernorm_gru(spec: CellSpec, p: Params, x: Tensor, state: State,
                       lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    # the spec's own project (LN_ih(W_ih x) + b_ih over every step, ATen); b_hh and the LN_hh shift go in as
    # one (3H,) shift (r multiplies its n part, so it cannot join xp); autograd covers the sum
    eps = spec.project.keywords["eps"]
    xp = spec.project(x, p)
    shift = _ln_hh_shift(p)
    if shift is None:
        shift = p["ln_weight_hh"].new_zeros(p["ln_weight_hh"].shape)
    args = (xp, p["weight_hh"], p["ln_weight_hh"], shift, state[0].contiguous(), _lengths(lengths), eps)
    reg = _regularizer_args(spec, p, ("h",))
    out, h_n = _ops.ln_gru_sequence(*args) if reg is None else _ops.ln_gru_reg_sequence(*args, *reg)
    return out, (h_n,)


def scan_indrnn(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    xp = _project(x, p["weight_ih"], _bias_sum(p))
    u = p["weight_hh"]
    bound = spec.extra.get("recurrent_max_abs")
    if bound is not None:  # the layer's |u| <= m, as its step applies it (autograd covers the clamp)
        u = u.clamp(-bound, bound)
    out, h_n = _ops.indrnn_sequence(xp, u, state[0].contiguous(), _lengths(lengths), _ops.ACT[spec.fusable])
    return out, (h_n,)


def scan_conv_lstm(spec: CellSpec, p: Params, x: Tensor, state: State,
                   lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    # the spec's own input convolution over every step (ATen, L folded into the batch; b_hh joins b_ih in its
    # bias), then the C++ time loop; autograd covers W_ih, the biases, x and the peepholes' broadcast
    xp = spec.project(x, {**p, "bias_ih": _bias_sum(p)})
    peepholes = [p.get(name) for name in ("weight_ci", "weight_cf", "weight_co")]
    if peepholes[0] is not None:
        peepholes = [w.expand(state[1].shape[1:]) for w in peepholes]  # (hidden, *S') from (hidden, 1, ...)
    out, h_n, c_n = _ops.conv_lstm_sequence(xp, p["weight_hh"], *peepholes, state[0].contiguous(),
                                            state[1].contiguous(), _lengths(lengths))
    return out, (h_n, c_n)


def scan_conv_gru(spec: CellSpec, p: Params, x: Tensor, state: State,
                  lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    xp = spec.project(x, p)  # W_ih * x + b_ih; b_hh stays with the recurrent convolution (r gates its n part)
    out, h_n = _ops.conv_gru_sequence(xp, p["weight_hh"], p.get("bias_hh"), state[0].contiguous(), _lengths(lengths))
    return out, (h_n,)


CONV_FAMILIES = ("conv_lstm", "conv_gru")
"""Families whose input is ``(L, N, C, *S)`` (1 to 3 spatial dims) instead of ``(L, N, H_in)``."""


KERNELS: Dict[str, Callable[..., Tuple[Tensor, State]]] = {
    "rnn_tanh": scan_rnn,
    "rnn_relu": scan_rnn,
    "lstm": scan_lstm,
    "gru": scan_gru,
    "peephole_lstm": scan_peephole_lstm,
    "layernorm_lstm": scan_layernorm_lstm,
    "indrnn_relu": scan_indrnn,
    "indrnn_tanh": scan_indrnn,
    "conv_lstm": scan_conv_lstm,
    "conv_gru": scan_conv_gru,
    "layernorm_gru": scan_layernorm_gru,
}
"""Fused kernel families by :attr:`CellSpec.fusable`. A new family (LayerNorm
LSTM, peephole, IndRNN...) joins by adding its C++ ops and a scan here."""


REGULARIZED_KERNELS: Dict[str, Callable[..., Tuple[Tensor, State]]] = {
    "lstm": scan_lstm_regularized,
    "gru": scan_gru_regularized,
    "peephole_lstm": scan_peephole_lstm,
    "layernorm_lstm": scan_layernorm_lstm,
    "layernorm_gru": scan_layernorm_gru,
}
"""Families whose kernels run zoneout and recurrent dropout themselves (see
:func:`rnnkit.runner.apply_regularizers`); the others decline those configurations."""


def fused_scan(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """The runner's scan for every fusable family (and the regularized ones of :data:`REGULARIZED_KERNELS`)."""
    if spec.fusable is None:
        applied = spec.extra.get(runner.REGULARIZED)
        if applied is None or applied.family not in REGULARIZED_KERNELS:
            raise RuntimeError(f"rnnkit fused backend: no fused kernel for the '{spec.name}' cell with these "
                               "regularizers (unsupported() should have declined it)")
        return REGULARIZED_KERNELS[applied.family](spec, p, x, state, lengths)
    return KERNELS[spec.fusable](spec, p, x, state, lengths)


# ------------------------------------------------------------------ the measured table

def load_table(path: Path = TABLE_PATH) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def size_class(batch: int, hidden: int) -> str:
    """The benchmark size (S, M, L) nearest to ``(batch, hidden)`` on a log scale."""
    def dist(ref):
        b, h = ref
        return (math.log2(max(batch, 1) / b)) ** 2 + (math.log2(max(hidden, 1) / h)) ** 2
    return min(SIZE_CLASSES, key=lambda k: dist(SIZE_CLASSES[k]))


BF16_FAMILIES = frozenset({"rnn_tanh", "rnn_relu", "lstm", "gru"})
"""Kernel families that also run bfloat16 (bf16 tensors at the op boundary, float32
gate math and cell state inside; see docs/fused.md, "bfloat16")."""


def table_key(module) -> Optional[str]:
    """The measured table's row for ``module``: its family, ``_proj`` with a
    projection, ``_bfloat16`` for bfloat16 parameters (float32 and float64 share
    the unsuffixed row)."""
    fam = getattr(module.cell_spec, "fusable", None)
    if fam is None:
        return None
    key = fam + ("_proj" if getattr(module, "proj_size", 0) else "")
    ref = next(iter(module.parameters()), None)
    if ref is not None and ref.dtype == torch.bfloat16:
        key += "_bfloat16"
    return key


def tensor_unsupported(ref: Optional[Tensor], x: Optional[Tensor], bfloat16: bool = False) -> Optional[str]:
    """Why the kernels cannot take these parameters (``ref``) and input, or None:
    they run on the CPU, in float32 and float64, and also in bfloat16 where
    ``bfloat16`` is true (the families of :data:`BF16_FAMILIES`)."""
    dtypes = (torch.float32, torch.float64, torch.bfloat16) if bfloat16 else (torch.float32, torch.float64)
    for t, what in ((ref, "parameters"), (x, "input")):
        if t is None or (t is ref and x is None and t.device.type == "meta"):
            continue  # asked before any input: parameters on meta get real storage later (to_empty)
        if t.device.type != "cpu":
            return f"the fused kernels run on the CPU, got {what} on {t.device}"
        if t.dtype not in dtypes:
            names = "float32, float64 and bfloat16" if bfloat16 else "float32 and float64"
            return f"the fused kernels run {names}, got {what} of dtype {t.dtype}"
    return None


class FusedBackend(Backend):
    """``backend="fused"``: each layer-direction of RNN (tanh/relu), LSTM (with or
    without ``proj_size``) and GRU runs as one C++ op with a hand-written backward.

    ``unavailable()`` builds the extension on first call (cached) and returns
    why it cannot run (disabled, no compiler, the compiler's first error line).
    ``unsupported(module, x)`` declines other cells, devices and dtypes.
    ``auto_order`` puts torch first where it measured faster: on this machine
    (:mod:`rnnkit.fused.calibrate`), else in the shipped ``auto_table.json``.

    Examples::

        >>> lstm = rnnkit.LSTM(32, 64, backend="fused")
        >>> out, (h, c) = lstm(torch.randn(100, 4, 32), lengths=torch.tensor([100, 50, 3, 0]))
        >>> lstm.last_backend
        'fused'
    """

    name = "fused"
    description = ("rnnkit's C++ kernels: whole-sequence time loop, hand-written backward (CPU, float32/float64; "
                   "bfloat16 for RNN/LSTM/GRU)")

    def __init__(self) -> None:
        self._warned = False
        self._warned_measure = False
        self._table: Optional[dict] = None
        self._calibrator = None

    # -- availability
    def unavailable(self) -> Optional[str]:
        reason = _build.load()
        if reason is None:
            _ops.register()
        return reason

    def unsupported(self, module, x: Optional[Tensor]) -> Optional[str]:
        spec = module.cell_spec
        reason = kernel_mode_reason(x, "fused kernels")
        if reason is not None:
            return reason
        if spec.fusable not in KERNELS:
            if spec.name.startswith("indrnn_"):
                return f"no fused kernel for the '{spec.name}' cell (IndRNN is fused for nonlinearity 'relu' and " \
                    "'tanh' only)"
            return f"no fused kernel for the '{spec.name}' cell"
        extra = module._regularizers_active() if hasattr(module, "_regularizers_active") else None
        if extra:
            if spec.fusable not in REGULARIZED_KERNELS:
                return f"the fused kernels have no {extra}"
            ref = next(iter(module.parameters()), None)
            if ref is not None and ref.dtype == torch.bfloat16:
                return f"the fused kernels run {extra} in float32 and float64 only, got parameters of dtype " \
                    f"{ref.dtype}"
        reason = tensor_unsupported(next(iter(module.parameters()), None), x,
                                    bfloat16=spec.fusable in BF16_FAMILIES)
        if reason is not None:
            return reason
        if x is not None and spec.fusable in CONV_FAMILIES:
            if not 4 <= x.dim() <= 6:
                return f"the fused conv kernels take (L, N, C, *S) inputs with 1 to 3 spatial dims, got {x.dim()}-D"
        elif x is not None and x.dim() != 3:
            return f"the fused kernels take (L, N, H_in) inputs, got {x.dim()}-D"
        return None

    def run(self, module, x, state0, lengths):
        out, states = run_stack(module, x, state0, lengths, fused_scan)
        return runner.own_output(module, out, lengths), states

    # -- auto
    def table(self) -> dict:
        if self._table is None:
            self._table = load_table()
        return self._table

    def calibrator(self):
        """What ``auto`` measured on this machine (:class:`rnnkit.fused.calibrate.Calibrator`)."""
        if self._calibrator is None:
            from . import calibrate
            self._calibrator = calibrate.Calibrator()
        return self._calibrator

    def table_choice(self, module, x: Optional[Tensor], lengths: Optional[Tensor] = None) -> Optional[str]:
        """The shipped table's fastest backend for this configuration, or None if unmeasured.
        With ``lengths``, the table's ``<cell>_lengths`` row is used where it was
        measured (torch then has to pack, which changes the answer)."""
        key = table_key(module)
        entries = self.table().get("fastest", {})
        if lengths is not None and f"{key}_lengths" in entries:
            key = f"{key}_lengths"
        if key not in entries:
            return None
        batch = x.shape[1] if x is not None and x.dim() >= 2 else 1
        return entries[key].get(size_class(batch, module.hidden_size))

    def _decide(self, module, x: Optional[Tensor], lengths: Optional[Tensor], measure: bool = True):
        """``(choice, klass, entry)``: ``entry`` is the measurement of ``klass`` on this machine
        (None: the choice is the shipped table's, or None for the default order); ``klass`` is None
        where the class has no measurement to make (torch's op has no such cell, or measuring is off)."""
        from . import calibrate
        mode = calibrate.measure_mode()
        klass = None
        if mode != "off":
            klass = calibrate.module_class(module, x, lengths)
            if klass is not None:
                cal = self.calibrator()
                entry = cal.lookup(klass)
                if entry is None and measure and mode == "on" and \
                        calibrate.why_not_measure(x) is None and self.unsupported(module, x) is None and \
                        _torch_runs(module, x):
                    prior = self.table_choice(module, x, lengths)
                    try:
                        entry = cal.measure(klass, prior=prior, max_warmup_s=calibrate.MAX_WARMUP_S)
                    except Exception as err:  # measuring must never break a forward: the table decides
                        if not self._warned_measure:
                            self._warned_measure = True
                            warnings.warn(f"rnnkit: backend='auto' could not measure fused vs torch for {klass} "
                                          f"({type(err).__name__}: {err}); using the shipped table",
                                          RuntimeWarning, stacklevel=6)
                        entry = {"best": prior or "fused", "how": "failed", "error": f"{type(err).__name__}: {err}"}
                        cal.record(klass, entry, persist=False)  # not tried again in this process
                if entry is not None:
                    return entry["best"], klass, entry
        return self.table_choice(module, x, lengths), klass, None

    def explain_choice(self, module, x: Optional[Tensor], lengths: Optional[Tensor] = None,
                       measure: bool = True) -> Tuple[Optional[str], str]:
        """``(choice, where it came from)``: the backend measured fastest on this machine for the
        configuration's class (measuring it now, the first time, when ``RNNKIT_AUTO_MEASURE`` allows
        and the context permits; see :mod:`rnnkit.fused.calibrate`), else the shipped table's
        choice, else None (the default order: fused first)."""
        best, klass, entry = self._decide(module, x, lengths, measure)
        if entry is not None and entry.get("how") in ("cut short", "failed"):
            source = "shipped table (auto_table.json)" if self.table_choice(module, x, lengths) else "default order"
            if entry["how"] == "failed":
                return best, f"{source}: measuring {klass} failed ({entry['error']}), for this process"
            return best, (f"{source}: measuring {klass} was cut short (its warm-up calls took "
                          f"{entry['fused_ms'] + entry['torch_ms']:.0f} ms), for this process")
        if entry is not None:
            from . import calibrate
            cal = self.calibrator()
            where = "in memory: the cache is not writable" if cal.persist_error is not None else \
                f"cache file {calibrate.cache_path()}"
            return best, (f"measured on this machine ({klass}: torch/fused "
                          f"{entry.get('torch_over_fused', float('nan')):.2f}; {where})")
        if best is None:
            return None, "not measured: the default order"
        return best, "shipped table (auto_table.json)"

    def choice(self, module, x: Optional[Tensor], lengths: Optional[Tensor] = None) -> Optional[str]:
        """The fastest backend for this configuration: measured on this machine, else the
        shipped table's, else None (see :meth:`explain_choice`)."""
        return self._decide(module, x, lengths)[0]

    def auto_order(self, module, x: Optional[Tensor], default_order: List[str],
                   lengths: Optional[Tensor] = None) -> List[str]:
        """``auto``'s order: the measured choice first. Where torch.nn measured faster
        (on this machine, else in the shipped table), torch goes first; unmeasured
        configurations keep ``default_order``. When the extension cannot be built,
        warn once and keep the order (the dispatcher then skips 'fused')."""
        return self.auto_plan(module, x, default_order, lengths)[0]

    def auto_plan(self, module, x: Optional[Tensor], default_order: List[str],
                  lengths: Optional[Tensor] = None) -> Tuple[List[str], bool]:
        """``(auto_order(...), settled)``: ``settled`` is true when the order is final for this
        configuration (the class was measured here, or has nothing to measure), so
        :func:`rnnkit.backends.select` may remember it; false while a later call may still measure."""
        if torch.compiler.is_compiling():
            # torch.compile and torch.export: the fused ops, opaque to the tracer, keep the batch size and
            # the sequence length symbolic (torch's op unrolls the time loop), whatever was measured; where the
            # kernels are not loaded yet (the process's first call is compiled) torch's op runs, and no warning
            return list(default_order), False
        reason = self.unavailable()
        if reason is not None:
            if not self._warned and _build.disabled() is None:
                self._warned = True
                warnings.warn(f"rnnkit: the fused backend is unavailable ({reason}); backend='auto' uses the "
                              "other backends. Set RNNKIT_DISABLE_FUSED=1 to silence this.", RuntimeWarning,
                              stacklevel=4)
            return list(default_order), False
        best, klass, entry = self._decide(module, x, lengths)
        settled = klass is None or entry is not None
        if best is None or best not in default_order or best == default_order[0]:
            return list(default_order), settled
        return [best] + [name for name in default_order if name != best], settled


def _torch_runs(module, x: Optional[Tensor]) -> bool:
    from ..backends import BACKENDS
    torch_backend = BACKENDS.get("torch")
    return torch_backend is not None and torch_backend.unavailable() is None and \
        torch_backend.unsupported(module, x) is None
