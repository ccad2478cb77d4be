"""The ``triton`` backend: rnnkit's GPU kernels, written in Triton, plugged into the runner.

As the ``fused`` backend, each layer-direction is one scan: the input projection of every step
in one matrix product (ATen, so autograd covers ``W_ih``, the biases and ``x``), then one
custom op for the time loop with hand-written backward kernels. Layers, directions,
``lengths`` and dropout stay the runner's (:func:`rnnkit.runner.run_stack`).

The kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` is set before rnnkit first runs a kernel (how the tests run them).
Families are keyed by ``spec.fusable or spec.name`` in :data:`KERNELS`, each loaded on first use.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .._checks import kernel_mode_reason
from ..backends import Backend
from ..runner import own_output, run_stack
from ..spec import CellSpec, Params, State
from . import _common as C

TABLE_PATH = Path(__file__).with_name("auto_table.json")

KERNELS: Dict[str, Tuple[str, str]] = {
    "rnn_tanh": ("rnn", "scan_rnn"),
    "rnn_relu": ("rnn", "scan_rnn"),
    "lstm": ("lstm", "scan_lstm"),
    "gru": ("gru", "scan_gru"),
    "peephole_lstm": ("peephole", "scan_peephole_lstm"),
    "layernorm_lstm": ("layernorm", "scan_layernorm_lstm"),
    "layernorm_gru": ("layernorm", "scan_layernorm_gru"),
    # part B (rnnkit/triton/elementwise.py, rnnkit/triton/conv.py): declined until written
    "indrnn_relu": ("elementwise", "scan_indrnn"),
    "indrnn_tanh": ("elementwise", "scan_indrnn"),
    "min_gru": ("elementwise", "scan_mingru"),
    "min_lstm": ("elementwise", "scan_minlstm"),
    "conv_lstm": ("conv", "scan_conv_lstm"),
    "conv_gru": ("conv", "scan_conv_gru"),
}
"""Kernel families by ``spec.fusable or spec.name``: ``(module in rnnkit.triton, scan function)``.
A scan has the fused backend's signature ``scan(spec, p, x, state, lengths) -> (out, state)``."""

CONV_FAMILIES = ("conv_lstm", "conv_gru")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_SCANS: Dict[str, Optional[Callable]] = {}
_MISSING: Dict[str, str] = {}


def family(spec: CellSpec) -> str:
    return spec.fusable or spec.name


def load_scan(fam: str) -> Optional[Callable]:
    """The scan of family ``fam`` (importing its kernel module), or None with the reason in
    :data:`_MISSING` (not written yet, or triton cannot import)."""
    if fam in _SCANS:
        return _SCANS[fam]
    module, name = KERNELS[fam]
    try:
        scan = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    except ImportError as err:
        missing = getattr(err, "name", None) or ""
        if missing.endswith(f"triton.{module}"):
            _MISSING[fam] = f"the triton kernels for the '{fam}' cell are not written yet"
        else:
            _MISSING[fam] = f"the triton kernels for the '{fam}' cell fail to import ({err})"
        scan = None
    except AttributeError:
        _MISSING[fam] = f"the triton kernels for the '{fam}' cell are not written yet (no {module}.{name})"
        scan = None
    _SCANS[fam] = scan
    return scan


def triton_scan(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """The runner's scan for every family of :data:`KERNELS`."""
    return load_scan(family(spec))(spec, p, x, state, lengths)


def tensor_unsupported(ref: Optional[Tensor], x: Optional[Tensor]) -> Optional[str]:
    """Why the kernels cannot take these parameters (``ref``) and input, or None: CUDA tensors (CPU
    tensors in the interpreter) of float32, float16, bfloat16 or float64."""
    interp = C.interpreting()
    for t, what in ((ref, "parameters"), (x, "input")):
        if t is None or (t is ref and x is None and t.device.type == "meta"):
            continue
        if t.device.type != "cuda" and not (interp and t.device.type == "cpu"):
            where = "CUDA (or CPU tensors with TRITON_INTERPRET=1)" if not interp else "CUDA or the CPU"
            return f"the triton kernels run on {where}, got {what} on {t.device}"
        if t.dtype not in DTYPES:
            return f"the triton kernels run float32, float16, bfloat16 and float64, got {what} of dtype {t.dtype}"
    return None


def load_table(path: Path = TABLE_PATH) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def size_class(batch: int, hidden: int, seq_len: int) -> str:
    """The measured table's column for a configuration: ``b{16|64}_h{64|256|1024}`` nearest on a log scale
    (the benchmark grid's batch and hidden sizes)."""
    import math

    def nearest(v, options):
        return min(options, key=lambda o: abs(math.log2(max(v, 1) / o)))
    return f"b{nearest(batch, (16, 64))}_h{nearest(hidden, (64, 256, 1024))}"


class TritonBackend(Backend):
    """``backend="triton"``: every layer-direction of RNN (tanh/relu), LSTM (with ``proj_size``), GRU,
    PeepholeLSTM and LayerNorm LSTM/GRU runs as one Triton custom op with hand-written backward
    kernels (persistent driver for hidden <= 64, alternating above); IndRNN, Min GRU/LSTM and
    ConvLSTM/ConvGRU join from rnnkit/triton/elementwise.py and conv.py.

    ``unavailable()``: no triton, or no CUDA and ``TRITON_INTERPRET`` unset.
    ``unsupported(module, x)``: other cells, regularizers, devices and dtypes, with a reason.

    Examples::

        >>> lstm = rnnkit.LSTM(32, 64, backend="triton", device="cuda", dtype=torch.bfloat16)
        >>> out, (h, c) = lstm(x, lengths=torch.tensor([100, 50, 3, 0]))
    """

    name = "triton"
    description = "rnnkit's Triton kernels: persistent and alternating drivers, hand-written backward (CUDA; CPU " \
                  "tensors through the interpreter)"

    def __init__(self) -> None:
        self._table: Optional[dict] = None

    def unavailable(self) -> Optional[str]:
        reason = C.triton_missing()
        if reason is not None:
            return reason
        if not C.interpreting() and not torch.cuda.is_available():
            return ("no CUDA device, and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 before rnnkit runs a "
                    "triton kernel to run them on CPU tensors through Triton's interpreter)")
        return None

    def unsupported(self, module, x: Optional[Tensor]) -> Optional[str]:
        spec = module.cell_spec
        reason = kernel_mode_reason(x, "triton kernels")
        if reason is not None:
            return reason
        fam = family(spec)
        if fam not in KERNELS:
            return f"no triton kernel for the '{spec.name}' cell"
        extra = module._regularizers_active() if hasattr(module, "_regularizers_active") else None
        if extra:
            return f"the triton kernels have no {extra}"
        reason = tensor_unsupported(next(iter(module.parameters()), None), x)
        if reason is not None:
            return reason
        if x is not None and fam in CONV_FAMILIES:
            if not 4 <= x.dim() <= 6:
                return f"the triton conv kernels take (L, N, C, *S) inputs with 1 to 3 spatial dims, got {x.dim()}-D"
        elif x is not None and x.dim() != 3:
            return f"the triton kernels take (L, N, H_in) inputs, got {x.dim()}-D"
        if self.unavailable() is None and load_scan(fam) is None:
            return _MISSING[fam]
        return None

    def run(self, module, x, state0, lengths):
        out, states = run_stack(module, x, state0, lengths, triton_scan)
        return own_output(module, out, lengths), states

    # -- auto (CUDA only)
    def table(self) -> dict:
        if self._table is None:
            self._table = load_table()
        return self._table

    def table_choice(self, module, x: Tensor, lengths: Optional[Tensor] = None) -> Optional[str]:
        """The measured table's faster backend ('torch' or 'triton') for this GPU and configuration,
        or None where it was not measured. Rows: ``<family>[_lengths]``, columns: :func:`size_class`."""
        try:
            gpu = torch.cuda.get_device_name(x.device)
        except Exception:
            return None
        rows = self.table().get("gpus", {}).get(gpu, {})
        key = family(module.cell_spec) + ("_lengths" if lengths is not None else "")
        batch = x.shape[1] if x.dim() >= 2 else 1
        return rows.get(key, {}).get(size_class(batch, module.hidden_size, x.shape[0]))

    def auto_order(self, module, x: Optional[Tensor], order: List[str],
                   lengths: Optional[Tensor] = None) -> List[str]:
        """``auto``'s order with triton placed: on CUDA inputs only (on the CPU auto never picks it),
        first where the table measured it faster than torch (cuDNN), else right after torch (so a cell
        torch cannot run goes to triton before the reference loop)."""
        if x is None or x.device.type != "cuda" or "triton" in order or self.unavailable() is not None:
            return list(order)
        order = list(order)
        if self.table_choice(module, x, lengths) == "triton":
            return ["triton"] + order
        at = order.index("torch") + 1 if "torch" in order else 0
        return order[:at] + ["triton"] + order[at:]
