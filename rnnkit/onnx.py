"""ONNX export of every rnnkit layer, through both of torch's exporters.

A plain ``torch.onnx.export(model, args, ...)`` works for a model holding any rnnkit layer on any
backend: while an ONNX export runs (``torch.onnx.is_in_onnx_export()``), every layer runs on the
``onnx`` export route below instead of its backend (the function is the same; only the ops differ):

* **RNN / LSTM / GRU** (and the peephole LSTM, whose peepholes are ONNX's ``P``) become ONNX's own
  ``RNN`` / ``LSTM`` / ``GRU`` operators, one per layer (both directions in one node), with
  ``sequence_lens`` when ``lengths=`` is passed (:func:`native_op`): under the default exporter
  through ``torch.onnx.ops.symbolic_multi_out``; under ``dynamo=False`` as the export-only custom ops
  ``torch.ops.rnnkit_onnx.{rnn,lstm,gru}``, whose arguments are exactly the ONNX operator's (weights
  already in ONNX's gate order) and whose symbolics rnnkit registers with
  ``torch.onnx.register_custom_op_symbolic`` (:func:`register`) at its first export.
* **Every other configuration** (the zoo, an LSTM with ``proj_size`` (ONNX's LSTM cannot project),
  RNN with another nonlinearity, zoneout in eval mode) becomes one loop over time per
  layer-direction, whose body is the cell's own step function (:attr:`rnnkit.CellSpec.step`), traced:
  with the default exporter through torch's ``scan`` higher-order op (``scan_op``: an ONNX ``Scan``); with
  ``dynamo=False`` through a TorchScript loop that calls the traced step (an ONNX ``Loop``). Either
  way the graph's size does not depend on the sequence length.

The plain ``torch.onnx.export`` call needs no extra argument. Besides public APIs, this uses
torch's prototype ``scan`` higher-order op and ``torch._C``'s tracing state (to trace a step while the
model's trace pauses). See docs/deploy.md, "ONNX".
"""

from __future__ import annotations

import collections
import itertools
import threading
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import Backend
from .runner import run_stack, valid_mask
from .spec import CellSpec, Params, State

__all__ = ["exporting", "native_op", "register"]

OPSET = 14
"""The lowest ONNX opset the translations are registered for (``dynamo=False``)."""


def exporting() -> bool:
    """True while ``torch.onnx.export`` (either exporter) traces the model."""
    return torch.onnx.is_in_onnx_export()


def _dynamo_exporting() -> bool:
    """True under the default (torch.export based) exporter; False under ``dynamo=False`` (a
    ``torch.jit.trace``) and in eager mode (the tests call the routes eagerly)."""
    return torch.compiler.is_compiling() and not torch.jit.is_tracing()


# ----------------------------------------------------------------------------- the native ops, ONNX's signature
#
# Each op takes exactly the ONNX operator's inputs (X (L, N, I); W (D, G*H, I); R (D, G*H, H); B (D, 2*G*H);
# sequence_lens (N,) int32; initial_h/initial_c (D, N, H); P (D, 3*H)) and attributes, in ONNX's gate order
# (LSTM i, o, f, c; GRU z, r, h with linear_before_reset=1), and returns its outputs Y (L, D, N, H), Y_h, Y_c.
# The eager implementation below computes ONNX's semantics in plain torch: TorchScript tracing runs it on the
# example input, and it is the oracle of the tests.

_LSTM_GATES = (0, 3, 1, 2)  # torch's i, f, g, o -> ONNX's i, o, f, c (indices into torch's chunks)
_GRU_GATES = (1, 0, 2)      # torch's r, z, n -> ONNX's z, r, h


def _to_onnx_gates(t: Tensor, order: Sequence[int]) -> Tensor:
    """Reorder the gate blocks of ``t`` (first axis, ``len(order)`` blocks) into ONNX's order: one gather
    of constant indices, which both exporters fold into the weight initializers."""
    block = t.shape[0] // len(order)
    index = torch.tensor([g * block + j for g in order for j in range(block)], dtype=torch.int64, device=t.device)
    return t.index_select(0, index)


def _directions(direction: str) -> int:
    return 2 if direction == "bidirectional" else 1


def _reverse(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    from .runner import reverse_sequences
    return reverse_sequences(x, None if lengths is None else lengths.to(torch.int64))


def _eager(kind: str, X: Tensor, W: Tensor, R: Tensor, B: Optional[Tensor], sequence_lens: Optional[Tensor],
           initial_h: Tensor, initial_c: Optional[Tensor], P: Optional[Tensor], hidden_size: int, direction: str,
           activation: str = "Tanh") -> Tuple[Tensor, ...]:
    """ONNX's RNN/LSTM/GRU (opset 14, layout 0) in torch ops."""
    H = hidden_size
    L = X.shape[0]
    lengths = None if sequence_lens is None else sequence_lens.to(torch.int64)
    ys, hs, cs = [], [], []
    for d in range(_directions(direction)):
        w, r = W[d], R[d]
        wb, rb = (B[d].chunk(2) if B is not None else (None, None))
        x = X if d == 0 else _reverse(X, lengths)
        xp = F.linear(x, w, wb)
        h = initial_h[d]
        c = initial_c[d] if initial_c is not None else None
        outs = []
        for t in range(L):
            if kind == "lstm":
                i, o, f, g = (xp[t] + F.linear(h, r, rb)).chunk(4, dim=-1)
                if P is not None:
                    p_i, p_o, p_f = P[d].chunk(3)
                    i, f = i + p_i * c, f + p_f * c
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                if P is not None:
                    o = o + p_o * c_new
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
            elif kind == "gru":
                x_z, x_r, x_h = xp[t].chunk(3, dim=-1)
                h_z, h_r, h_h = F.linear(h, r, rb).chunk(3, dim=-1)
                z, rr = torch.sigmoid(x_z + h_z), torch.sigmoid(x_r + h_r)
                n = torch.tanh(x_h + rr * h_h)
                h_new, c_new = (1 - z) * n + z * h, None
            else:
                pre = xp[t] + F.linear(h, r, rb)
                h_new, c_new = (torch.relu(pre) if activation == "Relu" else torch.tanh(pre)), None
            if lengths is not None:
                keep = (t < lengths).unsqueeze(1)
                h_new = torch.where(keep, h_new, h)
                if c is not None:
                    c_new = torch.where(keep, c_new, c)
            h, c = h_new, c_new
            outs.append(h)
        y = torch.stack(outs) if outs else X.new_zeros(0, X.shape[1], H)
        if lengths is not None:
            y = y.masked_fill(~valid_mask(lengths, L).unsqueeze(-1), 0.0)
        if d == 1:
            y = _reverse(y, lengths)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    result = (torch.stack(ys, dim=1), torch.stack(hs))
    return result + ((torch.stack(cs),) if kind == "lstm" else ())


def _fake_y(X: Tensor, D: int, H: int):
    return X.new_empty(X.shape[0], D, X.shape[1], H), X.new_empty(D, X.shape[1], H)


@torch.library.custom_op("rnnkit_onnx::lstm", mutates_args=())
def _lstm_op(X: Tensor, W: Tensor, R: Tensor, B: Optional[Tensor], sequence_lens: Optional[Tensor],
             initial_h: Tensor, initial_c: Tensor, P: Optional[Tensor], hidden_size: int,
             direction: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _eager("lstm", X, W, R, B, sequence_lens, initial_h, initial_c, P, hidden_size, direction)


@_lstm_op.register_fake
def _(X, W, R, B, sequence_lens, initial_h, initial_c, P, hidden_size, direction):
    y, y_h = _fake_y(X, _directions(direction), hidden_size)
    return y, y_h, X.new_empty(y_h.shape)


@torch.library.custom_op("rnnkit_onnx::gru", mutates_args=())
def _gru_op(X: Tensor, W: Tensor, R: Tensor, B: Optional[Tensor], sequence_lens: Optional[Tensor],
            initial_h: Tensor, hidden_size: int, direction: str) -> Tuple[Tensor, Tensor]:
    return _eager("gru", X, W, R, B, sequence_lens, initial_h, None, None, hidden_size, direction)


@_gru_op.register_fake
def _(X, W, R, B, sequence_lens, initial_h, hidden_size, direction):
    return _fake_y(X, _directions(direction), hidden_size)


@torch.library.custom_op("rnnkit_onnx::rnn", mutates_args=())
def _rnn_op(X: Tensor, W: Tensor, R: Tensor, B: Optional[Tensor], sequence_lens: Optional[Tensor],
            initial_h: Tensor, hidden_size: int, direction: str, activation: str) -> Tuple[Tensor, Tensor]:
    return _eager("rnn", X, W, R, B, sequence_lens, initial_h, None, None, hidden_size, direction, activation)


@_rnn_op.register_fake
def _(X, W, R, B, sequence_lens, initial_h, hidden_size, direction, activation):
    return _fake_y(X, _directions(direction), hidden_size)


@torch.library.custom_op("rnnkit_onnx::merge_directions", mutates_args=())
def _merge_op(Y: Tensor) -> Tensor:
    """ONNX's ``Y`` (L, D, N, H) as torch's output (L, N, D*H)."""
    return Y.permute(0, 2, 1, 3).reshape(Y.shape[0], Y.shape[2], Y.shape[1] * Y.shape[3])


@_merge_op.register_fake
def _(Y):
    return Y.new_empty(Y.shape[0], Y.shape[2], Y.shape[1] * Y.shape[3])


def merge_directions(Y: Tensor) -> Tensor:
    """The operator's ``Y`` (L, D, N, H) as the layer's output (L, N, D*H), in the nodes torch.nn's own export
    uses: one ``Squeeze`` for one direction, ``Transpose`` + ``Reshape`` to ``[0, 0, -1]`` (a constant shape:
    no Shape/Gather/Concat nodes computing it) for two."""
    if Y.shape[1] == 1:
        return Y.squeeze(1)
    if _dynamo_exporting():
        t = Y.permute(0, 2, 1, 3)
        shape = torch.tensor([0, 0, -1], dtype=torch.int64)
        return torch.onnx.ops.symbolic("Reshape", [t, shape], {}, dtype=Y.dtype,
                                       shape=(Y.shape[0], Y.shape[2], Y.shape[1] * Y.shape[3]), version=OPSET)
    if torch.jit.is_tracing():
        register()
        return torch.ops.rnnkit_onnx.merge_directions(Y)
    return Y.permute(0, 2, 1, 3).reshape(Y.shape[0], Y.shape[2], Y.shape[1] * Y.shape[3])


# ----------------------------------------------------------------------------- translations, dynamo=False

def _const(value):
    """The Python value of a constant argument of a TorchScript node."""
    node = value.node()
    kind = node.kindOf("value")
    if kind == "t":
        return node.t("value").item()
    return {"i": node.i, "s": node.s, "f": node.f}[kind]("value")


def _optional(g, value):
    """``value``, or ONNX's "missing input" where it is None."""
    if value is None or value.node().mustBeNone():
        n = g.op("prim::Constant")
        n.setType(torch._C.OptionalType.ofTensor())
        return n
    return value


def _symbolic_lstm(g, X, W, R, B, sequence_lens, initial_h, initial_c, P, hidden_size, direction):
    return g.op("LSTM", X, W, R, _optional(g, B), _optional(g, sequence_lens), initial_h, initial_c,
                _optional(g, P), hidden_size_i=_const(hidden_size), direction_s=_const(direction), outputs=3)


def _symbolic_gru(g, X, W, R, B, sequence_lens, initial_h, hidden_size, direction):
    return g.op("GRU", X, W, R, _optional(g, B), _optional(g, sequence_lens), initial_h,
                hidden_size_i=_const(hidden_size), direction_s=_const(direction), linear_before_reset_i=1,
                outputs=2)


def _symbolic_rnn(g, X, W, R, B, sequence_lens, initial_h, hidden_size, direction, activation):
    acts = [_const(activation)] * _directions(_const(direction))
    return g.op("RNN", X, W, R, _optional(g, B), _optional(g, sequence_lens), initial_h,
                hidden_size_i=_const(hidden_size), direction_s=_const(direction), activations_s=acts, outputs=2)


def _symbolic_merge_directions(g, Y):
    t = g.op("Transpose", Y, perm_i=[0, 2, 1, 3])
    return g.op("Reshape", t, g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64)))


_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register the ``dynamo=False`` translations of the ``rnnkit_onnx`` ops (once; rnnkit calls this
    itself at its first export, before the exporter converts the traced graph)."""
    global _registered
    with _lock:
        if not _registered:
            for name, fn in (("lstm", _symbolic_lstm), ("gru", _symbolic_gru), ("rnn", _symbolic_rnn),
                             ("merge_directions", _symbolic_merge_directions)):
                torch.onnx.register_custom_op_symbolic(f"rnnkit_onnx::{name}", fn, OPSET)
            _registered = True


def native_op(kind: str, X: Tensor, W: Tensor, R: Tensor, B: Optional[Tensor], sequence_lens: Optional[Tensor],
              initial_h: Tensor, initial_c: Optional[Tensor], P: Optional[Tensor], hidden_size: int, direction: str,
              activation: str = "Tanh") -> Tuple[Tensor, ...]:
    """ONNX's ``RNN``/``LSTM``/``GRU`` operator (``kind``), as the running exporter records it: under the default
    exporter through ``torch.onnx.ops.symbolic_multi_out`` (a node of the ONNX graph as is), under
    ``dynamo=False`` through the ``rnnkit_onnx`` custom ops and their registered symbolics."""
    if _dynamo_exporting():
        D, L, N = _directions(direction), X.shape[0], X.shape[1]
        attrs = {"hidden_size": hidden_size, "direction": direction}
        if kind == "gru":
            attrs["linear_before_reset"] = 1
        if kind == "rnn":
            attrs["activations"] = [activation] * D
        inputs = [X, W, R, B, sequence_lens, initial_h] + ([initial_c, P] if kind == "lstm" else [])
        shapes = [(L, D, N, hidden_size), (D, N, hidden_size)] + ([(D, N, hidden_size)] if kind == "lstm" else [])
        return tuple(torch.onnx.ops.symbolic_multi_out(kind.upper(), inputs, attrs, dtypes=[X.dtype] * len(shapes),
                                                       shapes=shapes, version=OPSET))
    register()
    if kind == "lstm":
        return torch.ops.rnnkit_onnx.lstm(X, W, R, B, sequence_lens, initial_h, initial_c, P, hidden_size, direction)
    if kind == "gru":
        return torch.ops.rnnkit_onnx.gru(X, W, R, B, sequence_lens, initial_h, hidden_size, direction)
    return torch.ops.rnnkit_onnx.rnn(X, W, R, B, sequence_lens, initial_h, hidden_size, direction, activation)


# ----------------------------------------------------------------------------- the native route

def native_kind(module) -> Optional[str]:
    """``"rnn"``, ``"lstm"`` or ``"gru"`` when ``module`` exports as ONNX's own operator, else None."""
    if module._regularizer_rates() is not None and (module.zoneout or module.zoneout_cell):
        return None  # zoneout changes the function in eval mode too: the loop runs its wrapped step
    spec = module.cell_spec
    if spec.name == "peephole_lstm":
        return "lstm"
    mode = spec.extra.get("torch_mode")
    if mode is None or not getattr(module, "_is_standard", False):
        return None
    if mode == "LSTM":
        return None if module.proj_size else "lstm"
    return {"GRU": "gru", "RNN_TANH": "rnn", "RNN_RELU": "rnn"}[mode]


def _native_stack(module, kind: str, x: Tensor, state0: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """The whole stack as one ONNX operator per layer (both directions in it)."""
    D, H = module.num_directions, module.hidden_size
    direction = "bidirectional" if D == 2 else "forward"
    seq_lens = None if lengths is None else lengths.to(torch.int32)
    order = {"lstm": _LSTM_GATES, "gru": _GRU_GATES, "rnn": (0,)}[kind]
    layer_input = x
    finals: List[List[Tensor]] = [[] for _ in state0]
    for layer in range(module.num_layers):
        ps = [module._layer_params(layer * D + d) for d in range(D)]
        W = torch.stack([_to_onnx_gates(p["weight_ih"], order) for p in ps])
        R = torch.stack([_to_onnx_gates(p["weight_hh"], order) for p in ps])
        B = None
        if any(p.get("bias_ih") is not None or p.get("bias_hh") is not None for p in ps):
            G = W.shape[1]
            B = torch.stack([torch.cat([_to_onnx_gates(p[n], order) if p.get(n) is not None else W.new_zeros(G)
                                        for n in ("bias_ih", "bias_hh")]) for p in ps])
        # one layer: the whole initial state (no Slice node), as torch.nn's export
        layer_state0 = state0 if module.num_layers == 1 else tuple(s.narrow(0, layer * D, D) for s in state0)
        h0 = layer_state0[0]
        if kind == "lstm":
            P = None
            if "weight_ci" in ps[0]:
                P = torch.stack([torch.cat([p["weight_ci"], p["weight_co"], p["weight_cf"]]) for p in ps])
            y, h_n, c_n = native_op("lstm", layer_input, W, R, B, seq_lens, h0, layer_state0[1], P, H, direction)
            new = (h_n, c_n)
        elif kind == "gru":
            y, h_n = native_op("gru", layer_input, W, R, B, seq_lens, h0, None, None, H, direction)
            new = (h_n,)
        else:
            activation = "Relu" if module.cell_spec.extra["torch_mode"] == "RNN_RELU" else "Tanh"
            y, h_n = native_op("rnn", layer_input, W, R, B, seq_lens, h0, None, None, H, direction, activation)
            new = (h_n,)
        if lengths is not None:  # rnnkit: a length-0 sequence keeps its initial state (ONNX leaves that open)
            empty = (lengths == 0).view(1, -1, 1)
            new = tuple(torch.where(empty, s0, s) for s0, s in zip(layer_state0, new))
        for acc, s in zip(finals, new):
            acc.append(s)
        layer_input = merge_directions(y)
        if module.dropout and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
    return layer_input, tuple(acc[0] if len(acc) == 1 else torch.cat(acc) for acc in finals)


# ----------------------------------------------------------------------------- the loop route

def _split_params(p: Params) -> Tuple[List[str], Dict[str, object]]:
    """The tensor entries of ``p`` (inputs of the loop body), and the rest (constants of the body)."""
    names = [k for k, v in p.items() if isinstance(v, Tensor)]
    return names, {k: v for k, v in p.items() if not isinstance(v, Tensor)}


def _keep(lengths: Optional[Tensor], seq_len: int, state: State) -> Optional[Tensor]:
    """``(L, N, 1, ...)`` bool: step ``t`` is inside sequence ``n`` (None without lengths)."""
    if lengths is None:
        return None
    keep = valid_mask(lengths, seq_len)
    return keep.view(*keep.shape, *([1] * (state[0].dim() - 1)))


def scan_hop(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """One layer-direction as torch's ``scan`` higher-order op over the cell's step (an ONNX ``Scan``).

    The op is called directly (``scan_op``), not through ``torch._higher_order_ops.scan.scan``: that
    wrapper runs every call through ``torch.compile`` of one shared function, so the scans of a model
    share one dynamo cache, and checking an earlier scan's guards (a static stride, say ``12``) against a
    later scan's symbolic inputs (a stride ``4*N``) specializes the batch when the two happen to be equal
    at the example batch (``4*3 == 12``): the default exporter then retries with a static batch, taking
    twice as long and giving a graph that runs at the example batch only. The body's parameters go in as
    the op's ``additional_inputs`` (the wrapper lifted closed-over tensors; the op itself takes none)."""
    from torch._higher_order_ops.scan import scan_op

    xp = spec.project(x, p)
    keep = _keep(lengths, x.shape[0], state)
    names, constants = _split_params(p)
    num_states = len(state)
    xs = [xp] if keep is None else [xp, keep]

    def body(*args):
        carry = tuple(args[:num_states])
        params = dict(zip(names, args[num_states + len(xs):]))
        params.update(constants)
        new = tuple(spec.step(args[num_states], carry, params))
        if keep is not None:
            new = tuple(torch.where(args[num_states + 1], n, s) for n, s in zip(new, carry))
        return [*new, new[0].clone()]  # the scan's output may not alias its carry

    # An inference graph: detached operands keep the scan's autograd rule (which builds the body's joint
    # forward-backward graph) out of the trace and of the exporter's later passes over the graph.
    with torch.no_grad():
        result = scan_op(body, [s.detach() for s in state], [t.detach() for t in xs],
                         tuple(p[k].detach() for k in names))
    return result[num_states], tuple(result[:num_states])


_STEP_IDS = itertools.count()
_alive: Deque[tuple] = collections.deque(maxlen=4096)
"""The traced steps and loops of the layers last exported with ``dynamo=False``: the exporter's graph
calls them by reference, so they must outlive the export."""


def _loop_source(num_states: int, num_params: int, masked: bool) -> str:
    s = [f"s{i}" for i in range(num_states)]
    n = [f"n{i}" for i in range(num_states)]
    ps = [f"p{i}" for i in range(num_params)]
    args = ", ".join(["xp: Tensor", "keep: Tensor"] + [f"{v}: Tensor" for v in s + ps])
    lines = [f"def loop({args}):",
             "    outs: List[Tensor] = []",
             "    for t in range(xp.size(0)):",
             f"        {', '.join(n)} = step_fn(xp[t], {', '.join(s + ps)})"]
    for si, ni in zip(s, n):
        lines.append(f"        {si} = torch.where(keep[t], {ni}, {si})" if masked else f"        {si} = {ni}")
    lines += ["        outs.append(s0)", f"    return torch.stack(outs), {', '.join(s)}"]
    return "\n".join(lines) + "\n"


def scan_script(spec: CellSpec, p: Params, x: Tensor, state: State,
                lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """One layer-direction as a TorchScript loop calling the traced step (an ONNX ``Loop``), for
    ``torch.onnx.export(..., dynamo=False)``, which traces the model with ``torch.jit.trace``."""
    xp = spec.project(x, p)
    names, constants = _split_params(p)
    num_states = len(state)
    keep = _keep(lengths, x.shape[0], state)

    def step(xp_t, *args):
        params = dict(zip(names, args[num_states:]))
        params.update(constants)
        new = spec.step(xp_t, tuple(args[:num_states]), params)
        return tuple(new) if num_states > 1 else new[0]

    # a name of its own: TorchScript finds a traced function by its qualified name
    step.__name__ = step.__qualname__ = f"step_{spec.name}_{next(_STEP_IDS)}"
    tensors = [p[k] for k in names]
    # trace the step on its own (the model's trace pauses meanwhile): a function of its inputs only
    outer = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        example = tuple(t.detach() for t in (xp[0], *state, *tensors))
        with torch.no_grad():
            traced = torch.jit.trace(step, example, check_trace=False)
        names_in_scope = {"step_fn": traced, "torch": torch, "List": List, "Tensor": Tensor}
        unit = torch.jit.CompilationUnit()
        unit.define(_loop_source(num_states, len(names), keep is not None), names_in_scope.get)
    finally:
        torch._C._set_tracing_state(outer)
    _alive.append((traced, unit))  # the traced graph refers to them until the exporter has inlined them
    result = unit.loop(xp, keep if keep is not None else xp.new_zeros(()), *state, *tensors)
    # the loop's stacked output has no known rank in the TorchScript graph: a reshape gives it one
    return result[0].reshape(xp.shape[0], *state[0].shape), tuple(result[1:])


# ----------------------------------------------------------------------------- the export route


def _refuse(module) -> None:
    """Raise for what an ONNX graph cannot compute the same way."""
    if module.training and (module.recurrent_dropout > 0 or module.zoneout > 0 or module.zoneout_cell > 0):
        raise RuntimeError(
            f"{module._describe()}: cannot export recurrent_dropout or zoneout in training mode to ONNX (they draw "
            f"random masks at every step; got recurrent_dropout={module.recurrent_dropout}, zoneout={module.zoneout}"
            f"). Call model.eval() before torch.onnx.export (zoneout then exports as its expectation).")


class OnnxExportBackend(Backend):
    """The route every layer takes while ``torch.onnx.export`` runs (see the module docstring)."""

    name = "onnx"
    description = "ONNX export: ONNX's RNN/LSTM/GRU operators, else a Scan/Loop over the cell's step"

    def run(self, module, x, state0, lengths):
        _refuse(module)
        kind = native_kind(module)
        if kind is not None:
            return _native_stack(module, kind, x, state0, lengths)
        return run_stack(module, x, state0, lengths, scan_hop if _dynamo_exporting() else scan_script)


EXPORT_BACKEND = OnnxExportBackend()
