"""The one generic sequence runner.

It owns stacking layers, both directions, per-sequence ``lengths`` and
inter-layer dropout for every layer in rnnkit. The time loop of one layer in
one direction is a *scan*, which a backend provides; the reference scan below
is the oracle every other backend is checked against.

All tensors here are time-major: ``x`` is ``(L, N, *F)``, a state is
``(D*num_layers, N, *S)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import RECURRENT_MASK
from .spec import CellSpec, Params, State

Scan = Callable[[CellSpec, Params, Tensor, State, Optional[Tensor]], Tuple[Tensor, State]]


def valid_mask(lengths: Tensor, seq_len: int) -> Tensor:
    """``(L, N)`` bool: True where step ``t`` is inside sequence ``n``."""
    return torch.arange(seq_len, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


def _per_row(mask: Tensor, like: Tensor) -> Tensor:
    """Reshape an ``(N,)`` mask to broadcast against ``(N, *S)``."""
    return mask.view(mask.shape[0], *([1] * (like.dim() - 1)))


def reverse_sequences(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverse each sequence within its own length; padding stays in place.

    With ``lengths`` ``[3, 1]`` and ``L = 4``, row 0 reads steps ``2, 1, 0, 3``
    and row 1 reads ``0, 1, 2, 3``. The map is its own inverse.
    """
    if lengths is None:
        return x.flip(0)
    seq_len, batch = x.shape[0], x.shape[1]
    t = torch.arange(seq_len, device=x.device).unsqueeze(1)
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (L, N)
    return x[index, torch.arange(batch, device=x.device)]


def reference_scan(spec: CellSpec, p: Params, x: Tensor, state: State, lengths: Optional[Tensor]) -> Tuple[Tensor, State]:
    """One layer, one direction, forward in time, in plain PyTorch ops.

    Returns the outputs ``(L, N, *S_h)`` and the final state. A sequence past
    its length keeps its state (so its final state is the one after step
    ``lengths[n] - 1``); its outputs there are garbage for the runner to mask.
    """
    xp = spec.project(x, p)  # (L, N, G*H...) all steps in one product
    if spec.sequence is not None:
        return spec.sequence(xp, state, p, lengths)
    seq_len = x.shape[0]
    # steps before the shortest length need no masking: one sync, then none
    if lengths is None:
        masked_from = seq_len
    elif torch.compiler.is_compiling() or not lengths.numel():
        masked_from = 0  # mask every step: the same result without reading the lengths' values
    else:
        masked_from = int(lengths.min())
    outputs = []
    # a parameter under PER_STEP keys is (L, ...): each step reads its row t (zoneout's masks)
    per_step = {k: v.unbind(0) for k, v in p.items() if k.startswith(PER_STEP)}
    # one unbind (one backward node that stacks the step gradients) instead of xp[t] per step, whose
    # backward each fills a zero tensor of xp's full size: O(L^2) time for L steps
    for t, xp_t in enumerate(xp.unbind(0)):
        p_t = {**p, **{k: v[t] for k, v in per_step.items()}} if per_step else p
        new = spec.step(xp_t, state, p_t)
        if t >= masked_from:
            keep = _per_row(t < lengths, new[0])
            new = tuple(torch.where(keep, n, s) for n, s in zip(new, state))
        state = new
        outputs.append(state[0])
    return torch.stack(outputs), state


def run_stack(module, x: Tensor, state0: State, lengths: Optional[Tensor], scan: Scan) -> Tuple[Tensor, State]:
    """Run ``module``'s layers and directions over ``x`` with ``scan``.

    ``module`` supplies ``cell_spec``, ``num_layers``, ``num_directions``,
    ``dropout``, ``training`` and ``_layer_params(k)`` for ``k = layer * D +
    direction`` (the layer-major, direction-minor order of ``h_n``).
    Returns the last layer's output ``(L, N, D*H_out...)`` (padding not yet
    masked) and the final states, each ``(D*num_layers, N, ...)``.

    A module with ``_regularizer_rates()`` gets recurrent dropout and zoneout
    here (:func:`apply_regularizers`), for every layer-direction, whatever the scan.
    """
    spec = module.cell_spec
    num_dirs = module.num_directions
    rates = module._regularizer_rates() if hasattr(module, "_regularizer_rates") else None
    finals = [[] for _ in state0]
    layer_input = x
    live = None  # the live steps in packed order, for inter-layer dropout with lengths (computed once)
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(num_dirs):
            k = layer * num_dirs + direction
            s0 = tuple(s[k] for s in state0)
            p = module._layer_params(k)
            spec_k, p = apply_regularizers(spec, p, s0, rates, module.training, layer_input.shape[0])
            if direction == 0:
                out, s_n = scan(spec_k, p, layer_input, s0, lengths)
            else:
                out, s_n = scan(spec_k, p, reverse_sequences(layer_input, lengths), s0, lengths)
                out = reverse_sequences(out, lengths)
            outputs.append(out)
            for acc, s in zip(finals, s_n):
                acc.append(s)
        layer_input = outputs[0] if num_dirs == 1 else torch.cat(outputs, dim=2)
        if module.dropout and module.training and layer < module.num_layers - 1:
            if lengths is None:
                layer_input = F.dropout(layer_input, module.dropout, training=True)
            else:
                if live is None:
                    # clamped as the torch backend packs (it runs an empty sequence for one step), so every
                    # backend draws the same masks
                    live = live_positions(lengths.clamp(min=1), x.shape[0], getattr(module, "_packed_order", None))
                layer_input = dropout_live(layer_input, module.dropout, live)
    return layer_input, tuple(torch.stack(acc) for acc in finals)


def live_positions(lengths: Tensor, seq_len: int, order: Optional[Tensor] = None) -> Tensor:
    """The flat positions ``t * N + n`` of the steps inside their sequence, in a PackedSequence's data
    order: step by step, each step's live sequences in ``order`` (the PackedSequence's ``sorted_indices``;
    by default the order ``pack_padded_sequence(..., enforce_sorted=False)`` sorts ``lengths`` into)."""
    batch = lengths.shape[0]
    if order is None:
        order = torch.sort(lengths.cpu(), descending=True).indices.to(lengths.device)
    t = torch.arange(seq_len, device=lengths.device).unsqueeze(1)
    live = t < lengths[order].unsqueeze(0)  # (L, N), columns in sorted order
    return (t * batch + order.unsqueeze(0))[live]


def dropout_live(x: Tensor, p: float, positions: Tensor) -> Tensor:
    """Inter-layer dropout of a padded ``x (L, N, F)``, drawn as torch.nn draws it on a packed batch: one
    mask over the live steps only (``positions``, from :func:`live_positions`), in the packed data's order
    (so a seed gives torch.nn's masks for the same PackedSequence, and the random stream continues as
    torch.nn's); padding positions pass unchanged (masked later)."""
    seq_len, batch = x.shape[0], x.shape[1]
    flat = x.reshape(seq_len * batch, *x.shape[2:])
    dropped = F.dropout(flat.index_select(0, positions), p, training=True)
    return flat.index_copy(0, positions, dropped).view(x.shape)


def own_output(module, out: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """``out`` of a fast backend's :func:`run_stack`, for the caller: a copy where it is the last
    layer's op output that the op's backward reads (training, one direction, no ``lengths``: two
    directions are concatenated and ``lengths`` are masked into new tensors anyway). So a caller may
    change the output in place before the backward (``F.relu(out, inplace=True)``), as with torch.nn's
    op, instead of autograd's "modified by an inplace operation" error. Not while ``torch.jit.trace``
    records (the graph must not depend on the grad mode) or torch.compile/export trace (functionalized)."""
    if (out.requires_grad and module.num_directions == 1 and lengths is None and not torch._C._get_tracing_state()
            and not torch.compiler.is_compiling()):
        return out.clone()
    return out


def mask_padding(out: Tensor, lengths: Optional[Tensor], padding_value: float) -> Tensor:
    """Set the output at ``t >= lengths[n]`` to ``padding_value`` (no gradient flows there)."""
    if lengths is None:
        return out
    valid = valid_mask(lengths, out.shape[0])
    valid = valid.view(*valid.shape, *([1] * (out.dim() - 2)))
    return out.masked_fill(~valid, padding_value)


# ----------------------------------------------------------------------------- regularizers
#
# Every random mask of recurrent dropout, zoneout and weight-drop is drawn by
# bernoulli_mask below (tests patch that one function to fix the masks), and
# applied here, never inside a cell: recurrent dropout and zoneout by
# apply_regularizers (called by run_stack per layer-direction), weight-drop by
# drop_connect (called by RecurrentBase.forward once per forward, so that the
# torch backend runs the same dropped weights).


@dataclasses.dataclass(frozen=True)
class RegularizerRates:
    """A layer's regularizer rates, as the runner reads them.

    Attributes:
        recurrent_dropout: probability of zeroing a unit of ``h_{t-1}`` in the
            recurrent projection (one mask per sequence and layer-direction).
        zoneout: per state tensor (``h`` then ``c``), the probability that a
            unit keeps its previous value at a step.
        weight_drop: probability of zeroing an element of ``weight_hh`` (one mask per forward).
    """

    recurrent_dropout: float = 0.0
    zoneout: Tuple[float, ...] = ()
    weight_drop: float = 0.0

    def any_zoneout(self) -> bool:
        return any(r > 0 for r in self.zoneout)


REGULARIZED = "regularized"
"""The key of a regularized spec's ``extra`` holding its :class:`AppliedRegularizers`."""


@dataclasses.dataclass(frozen=True)
class AppliedRegularizers:
    """What :func:`apply_regularizers` did to a spec, for a scan that runs it itself.

    Attributes:
        family: the unregularized spec's ``fusable`` kernel family (or None).
        zoneout: the zoneout rates per state (``h`` then ``c``), ``()`` without zoneout.
        training: masks per step (True) or the expectation (False).
    """

    family: Optional[str]
    zoneout: Tuple[float, ...]
    training: bool


def bernoulli_mask(shape, prob: float, like: Tensor, what: str) -> Tensor:
    """A ``{0, 1}`` tensor of ``shape`` (dtype and device of ``like``) whose
    elements are 1 with probability ``prob``, from torch's global generator (so
    ``torch.manual_seed`` reproduces it). ``what`` names the use
    (``"recurrent_dropout"``, ``"zoneout_h"``, ``"zoneout_c"``, ``"weight_drop"``).

    Each element compares 32 random bits with ``prob * 2**32`` (so ``prob`` is
    honoured to ``2**-32``, finer than ``torch.rand``'s 24 bits), two elements per
    64-bit draw: on a CPU that is a third of ``bernoulli_``'s time, whose generator
    draws one number per element (``benchmarks/fused_regularizers.py``, ``masks``)."""
    numel = math.prod(shape)
    threshold = round(prob * 2.0 ** 32) - 2 ** 31  # u (uniform int32) < threshold w.p. prob
    if threshold <= -(2 ** 31) or threshold >= 2 ** 31:
        return torch.full(shape, float(threshold > 0), dtype=like.dtype, device=like.device)
    # [-2^63, 2^63 - 1): 64 random bits (torch.compile traces randint, not random_)
    words = torch.randint(-(2 ** 63), 2 ** 63 - 1, ((numel + 1) // 2,), dtype=torch.int64, device=like.device)
    bits = words.view(torch.int32)[:numel].view(shape)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        # inside torch.func (vmap(randomness="different") makes ``words`` batched): ``out=`` has no batching rule
        return torch.lt(bits, threshold).to(like.dtype)
    mask = torch.empty(shape, dtype=like.dtype, device=like.device)
    torch.lt(bits, threshold, out=mask)  # no bool tensor in between
    return mask


def drop_connect(weight: Tensor, rate: float) -> Tensor:
    """DropConnect: ``weight * m / (1 - rate)``, ``m ~ Bernoulli(1 - rate)`` elementwise."""
    return weight * bernoulli_mask(weight.shape, 1.0 - rate, weight, "weight_drop") / (1.0 - rate)


PER_STEP = "per_step:"
"""The prefix of a parameter that holds one row per step, ``(L, ...)``: the reference
scan hands the step its row ``t`` under the same key (zoneout's masks,
:func:`zoneout_mask_key`)."""


def zoneout_mask_key(state_name: str) -> str:
    """The key of state ``state_name``'s zoneout masks ``(L, *S)`` in a regularized ``p``."""
    return f"{PER_STEP}zoneout_{state_name}"


def apply_regularizers(spec: CellSpec, p: Params, state0: State, rates: Optional[RegularizerRates],
                       training: bool, seq_len: int) -> Tuple[CellSpec, Params]:
    """The spec and params one layer-direction runs with, under ``rates``, over ``seq_len`` steps.

    * recurrent dropout (training only): one mask ``m / (1 - rate)`` of
      ``state0[0]``'s shape ``(N, H_out)``, put into ``p`` under
      :data:`rnnkit.functional.RECURRENT_MASK` for the cell's recurrent projection;
    * zoneout: the step is wrapped so that state ``j`` becomes
      ``k * s_{t-1} + (1 - k) * s_t`` with a fresh mask ``k ~ Bernoulli(rate_j)``
      at each step in training, and ``rate_j * s_{t-1} + (1 - rate_j) * s_t``
      (the expectation) in eval. In training the masks of all steps are drawn
      here, one :func:`bernoulli_mask` call per state (``h`` then ``c``) of shape
      ``(seq_len, *S)``, into ``p`` under :func:`zoneout_mask_key`; the reference
      scan hands step ``t`` its row (:data:`PER_STEP`).

    A regularized spec has no ``sequence`` scan and no ``fusable`` kernel, so
    every scan loops its (wrapped) step, except a scan that runs the
    regularizers itself: the spec's ``extra[REGULARIZED]`` (an
    :class:`AppliedRegularizers`) says what was applied to which kernel family,
    and it reads the same masks from ``p`` (so a seed gives both the same masks).
    """
    if rates is None:
        return spec, p
    changes = {}
    if training and rates.recurrent_dropout > 0:
        keep = 1.0 - rates.recurrent_dropout
        h0 = state0[0]
        p = {**p, RECURRENT_MASK: bernoulli_mask(h0.shape, keep, h0, "recurrent_dropout") / keep}
        changes.update(sequence=None, fusable=None)
    if rates.any_zoneout():
        if training:
            p = dict(p)
            for name, s0, rate in zip(spec.state_names, state0, rates.zoneout):
                if rate > 0:
                    p[zoneout_mask_key(name)] = bernoulli_mask((seq_len, *s0.shape), rate, s0, f"zoneout_{name}")
        changes.update(step=_zoneout_step(spec, rates.zoneout, training), sequence=None, fusable=None)
    if changes:
        applied = AppliedRegularizers(spec.fusable, rates.zoneout if rates.any_zoneout() else (), training)
        changes["extra"] = {**spec.extra, REGULARIZED: applied}
    return (dataclasses.replace(spec, **changes) if changes else spec), p


def _zoneout_step(spec: CellSpec, zoneout: Tuple[float, ...], training: bool):
    step = spec.step
    names = spec.state_names

    def zoneout_step(xp: Tensor, state: State, p: Params) -> State:
        new = step(xp, state, p)
        mixed = []
        for name, s_prev, s_new, rate in zip(names, state, new, zoneout):
            if rate == 0:
                mixed.append(s_new)
            elif training:
                keep = p[zoneout_mask_key(name)]  # this step's row of the masks apply_regularizers drew
                mixed.append(keep * s_prev + (1 - keep) * s_new)
            else:
                mixed.append(rate * s_prev + (1 - rate) * s_new)
        return tuple(mixed)

    return zoneout_step
