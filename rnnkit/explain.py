"""The shape explainer: ``rnnkit.explain(module, input_shape_or_tensor)``.

It reads the input exactly as the layer's forward does (the same checks, so the
same words when the input does not fit), then lays out what comes back: the
shape of ``output``, ``h_n`` (and ``c_n``), what each axis means, which rows of
``h_n`` equal which slices of ``output``, and every parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._checks import InputReading, check_states, layout_symbols, read_input, shape_str

ShapeLike = Union[Tensor, Sequence[int], torch.Size]


@dataclass
class Explanation:
    """What :func:`explain` found. ``str()`` gives a short table, :meth:`to_dict` the content."""

    module: str
    ok: bool
    input_shape: Tuple[int, ...]
    reading: Optional[Dict[str, Any]] = None
    outputs: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    parameters: List[Dict[str, Any]] = field(default_factory=list)
    total_parameters: int = 0
    error: Optional[str] = None
    fix: Optional[str] = None
    error_type: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "module": self.module, "ok": self.ok, "input_shape": list(self.input_shape), "reading": self.reading,
            "outputs": self.outputs, "notes": self.notes, "parameters": self.parameters,
            "total_parameters": self.total_parameters, "error": self.error, "fix": self.fix,
            "error_type": self.error_type,
        }

    def __str__(self) -> str:
        lines = [f"{self.module} on input {shape_str(self.input_shape)}"]
        if not self.ok:
            lines.append(f"  does not fit: {self.error}")
            if self.fix:
                lines.append(f"  fix: {self.fix}")
        else:
            r = self.reading
            rows = [("input", shape_str(self.input_shape),
                     " | ".join(f"{a['symbol']}={a['size']} {a['meaning']}" for a in r["axes"]) + f"   [{r['layout']}]")]
            rows += [(o["name"], shape_str(o["shape"]), " | ".join(o["axes"])) for o in self.outputs]
            width = max(len(n) for n, _, _ in rows)
            swidth = max(len(s) for _, s, _ in rows)
            lines += [f"  {n:<{width}}  {s:<{swidth}}  {m}" for n, s, m in rows]
            lines += [f"  - {note}" for note in self.notes]
        if self.parameters:
            lines.append("  parameters:")
            nwidth = max(len(p["name"]) for p in self.parameters)
            swidth = max(len(shape_str(p["shape"])) for p in self.parameters)
            for p in self.parameters:
                lines.append(f"    {p['name']:<{nwidth}}  {shape_str(p['shape']):<{swidth}}  {p['count']:>12,}")
            lines.append(f"    {'total':<{nwidth}}  {'':<{swidth}}  {self.total_parameters:>12,}")
        return "\n".join(lines)

    __repr__ = __str__


def _as_probe(input: ShapeLike) -> Tuple[Tensor, bool]:
    """A shape-only stand-in for the input (a meta tensor), and whether it was packed."""
    from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
    if isinstance(input, PackedSequence):
        padded, _ = pad_packed_sequence(input)
        return torch.empty(padded.shape, device="meta"), True
    if isinstance(input, Tensor):
        return torch.empty(input.shape, device="meta"), False
    if isinstance(input, (tuple, list, torch.Size)) and all(isinstance(n, int) and n >= 0 for n in input):
        return torch.empty(tuple(input), device="meta"), False
    raise TypeError(f"explain: input must be a Tensor, a PackedSequence or a shape (a tuple of ints), got {input!r}")


def _state_probe(hx):
    """Shape-only stand-ins for a state: a tensor or shape, or a tuple of them."""
    is_shape = isinstance(hx, (tuple, list, torch.Size)) and all(isinstance(n, int) for n in hx)
    if isinstance(hx, (tuple, list)) and not is_shape:
        return tuple(_as_probe(h)[0] for h in hx)
    return _as_probe(hx)[0]


def _split_fix(message: str) -> Tuple[str, Optional[str]]:
    parts = re.split(r"\.?\s*Fix: ", message, maxsplit=1)
    return (parts[0], parts[1]) if len(parts) == 2 else (message, None)


def explain(module, input: ShapeLike, hx=None) -> Explanation:
    """Explain what ``module`` does with an input of this shape, without running it.

    Args:
        module: any rnnkit layer (``rnnkit.LSTM``, ``rnnkit.GRU``, ...).
        input: a tensor, a PackedSequence, or just its shape, e.g. ``(10, 3, 50)``.
        hx: optionally the initial state (tensors, or shapes) to check as well.

    Returns:
        An :class:`Explanation`; ``print()`` it for a table, ``.to_dict()`` for data.
        When the input does not fit, ``.ok`` is False, ``.error`` holds the same
        message the layer would raise (up to its fix), ``.error_type`` the name of
        the exception class it would raise (e.g. ``'RNNShapeError'``, see
        :mod:`rnnkit.errors`) and ``.fix`` what to change.

    Example::

        >>> print(rnnkit.explain(rnnkit.LSTM(50, 100, 2), (10, 3, 50)))
    """
    params = [{"name": n, "shape": list(p.shape), "count": p.numel()} for n, p in module.named_parameters()]
    total = sum(p["count"] for p in params)
    probe, packed = _as_probe(input)
    result = Explanation(module=module._describe(), ok=True, input_shape=tuple(probe.shape),
                         parameters=params, total_parameters=total)
    try:
        reading = read_input(module, probe, packed=packed)
        expected = module._state_shapes(reading.batch, reading.feature_shape)
        if hx is not None:
            check_states(module, _state_probe(hx), reading, expected, ref=None)
    except (ValueError, TypeError) as exc:
        result.ok = False
        result.error_type = type(exc).__name__
        result.error, result.fix = _split_fix(str(exc))
        if result.fix is None:
            result.fix = _generic_fix(module, packed)
        return result

    result.reading = {
        "layout": reading.describe().split("[", 1)[1].rstrip("]"),
        "batched": reading.batched, "batch_first": reading.batch_first, "packed": reading.packed,
        "axes": [{"symbol": s, "size": n, "meaning": m} for s, n, m in reading.axes],
    }
    result.outputs = _outputs(module, reading, expected)
    result.notes = _notes(module, reading)
    return result


def _generic_fix(module, packed: bool) -> str:
    fsyms = list(module._feature_symbols())
    batched = layout_symbols(module.batch_first and not packed, True, fsyms)
    return (f"pass a {len(batched)}-D input laid out as ({', '.join(batched)}) "
            f"(batch_first={module.batch_first}), or {len(fsyms) + 1}-D ({', '.join(['L'] + fsyms)}) unbatched")


def _outputs(module, reading: InputReading, expected) -> List[Dict[str, Any]]:
    D, layers = module.num_directions, module.num_layers
    h_trailing = expected[0][2:]
    out_feature = (D * h_trailing[0],) + tuple(h_trailing[1:])
    feature_axes = [f"D*H_out={D}*{h_trailing[0]}"] + [f"{n} spatial" for n in h_trailing[1:]]
    if reading.packed:
        out = {"name": "output", "shape": [], "axes": ["PackedSequence (same batch_sizes and order as the input); "
                                                       f"padded: (L, N, {', '.join(map(str, out_feature))})"]}
    else:
        lead = [("L", reading.seq_len, "sequence"), ("N", reading.batch, "batch")]
        if not reading.batched:
            lead = lead[:1]
        elif reading.batch_first:
            lead = lead[::-1]
        out = {"name": "output", "shape": [n for _, n, _ in lead] + list(out_feature),
               "axes": [f"{s}={n} {m}" for s, n, m in lead] + feature_axes}
    rows = [out]
    order = "layer-major, direction-minor" if D == 2 else "one row per layer"
    for name, shape in zip(module.cell_spec.state_names, expected):
        sym = "H_out" if name == "h" else "H"
        axes = [f"D*num_layers={D}*{layers} ({order})"]
        if reading.batched:
            axes.append(f"N={reading.batch} batch")
        axes.append(f"{sym}={shape[2]}")
        axes += [f"{n} spatial" for n in shape[3:]]
        full = list(shape) if reading.batched else [shape[0]] + list(shape[2:])
        rows.append({"name": f"{name}_n", "shape": full, "axes": axes})
    return rows


def _notes(module, reading: InputReading) -> List[str]:
    D, layers = module.num_directions, module.num_layers
    notes = []
    bf = reading.batch_first and reading.batched
    # index the time axis, then (batched) the batch axis, so the next index is the feature axis
    if not reading.batched:
        last, first = "output[-1", "output[0"
    elif bf:
        last, first = "output[:, -1", "output[:, 0"
    else:
        last, first = "output[-1, :", "output[0, :"
    if bf:
        notes.append("batch_first=True changes input and output only: h_n keeps (D*num_layers, N, H_out)")
    if D == 1:
        notes.append(f"h_n[-1] == {last.rstrip(', :')}] (the last layer's final state is the last output step)")
        if layers > 1:
            notes.append(f"h_n[k] is layer k's final state, k = 0..{layers - 1}")
    else:
        notes.append("h_n rows: " + ", ".join(f"{2 * k}: layer {k} forward, {2 * k + 1}: layer {k} reverse"
                                             for k in range(layers)))
        h_out = module._state_shapes(1, reading.feature_shape)[0][2]
        notes.append(f"h_n[-2] (last layer, forward) == {last}, :{h_out}]")
        notes.append(f"h_n[-1] (last layer, reverse) == {first}, {h_out}:] -- NOT {last.rstrip(', :')}]")
    notes.append("with lengths=..., read output at lengths - 1 instead of -1; h_n already holds each sequence's "
                 "state after its own last step")
    return notes
