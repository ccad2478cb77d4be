"""NaN and Inf through the fused kernels, and their shape checks.

A NaN or an Inf in the input, a weight, a bias or an initial state must come out
of ``backend="fused"`` where it comes out of the reference backend (which is
plain ATen, like torch.nn): same NaN and same +-Inf positions in the outputs,
the final states and, after a backward, in the gradients of the input, the
initial states and every parameter; in float64 the finite values agree to 1e-10
too. Every fused family (the registry walk, plus the variants of
``rnnkit.fused.KERNELS``: RNN tanh/relu, LSTM with and without a projection,
IndRNN relu/tanh, ConvLSTM with peepholes), in every dtype it runs fused
(bfloat16 for RNN/LSTM/GRU), the single-step cells (the direct CPython entry,
the ``*_cell`` ops, and the differentiable step), and ``lengths``.

``lengths``: the oracle is the reference backend run on each row alone (its
valid steps, no lengths), which is what lengths mean. The batched reference
backend is not one for gradients: it runs the step on held rows too and
discards the result with ``torch.where``, whose backward multiplies the zero
gradient by that step's derivatives, so a NaN anywhere in a held row (even in
the padding) turns its gradients NaN everywhere. Its outputs and final states
are checked against the fused ones as well.

Wrong shapes: every ``torch.ops.rnnkit_fused`` op, each tensor argument in turn
given a wrong rank, a 0-d tensor, an extra row, a shorter last axis or another
dtype, must raise RuntimeError (not read out of bounds, not crash): run in a
subprocess, so a crash fails the test instead of the whole run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS
from rnnkit.fused import KERNELS, _build, cells as fc
from rnnkit.fused.backend import BF16_FAMILIES
from helpers import flatten_states

REASON = BACKENDS["fused"].unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny sizes: one thread (on a loaded 2-core machine every parallel region of a 2-thread pool
    can wait for a descheduled worker, which made this file 10-50 times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
L, N, I, H = 2, 3, 3, 9  # H = 9: whole float32/float64 vectors and a remainder; 2 steps: NaN reaches W_hh h
CONV_C, CONV_H = 2, 3

# extra variants of the registry's layers, so that every KERNELS family is run
VARIANTS = {
    "rnn": [{}, {"nonlinearity": "relu"}],
    "lstm": [{}, {"proj_size": 4}],
    "indrnn": [{}, {"nonlinearity": "tanh"}],
    "convlstm1d": [{"peephole": True}],
}
def _families():
    """(id, LayerEntry, kwargs, dtype) for every fused family and dtype."""
    out = []
    for name, entry in rnnkit.LAYERS.items():
        for kw in VARIANTS.get(name, [{}]):
            probe = entry.make(I, H, **kw) if entry.spatial is None else entry.make(CONV_C, CONV_H, **kw)
            fam = probe.cell_spec.fusable
            if fam not in KERNELS:
                continue
            dtypes = [torch.float32, torch.float64] + ([torch.bfloat16] if fam in BF16_FAMILIES else [])
            tag = fam + ("_proj" if kw.get("proj_size") else "") + ("_peephole" if kw.get("peephole") else "")
            for dt in dtypes:
                out.append(pytest.param(entry, kw, dt, id=f"{name}-{tag}-{str(dt)[6:]}"))
    return out


FAMILIES = _families()


def test_every_kernel_family_is_covered():
    seen = set()
    for p in FAMILIES:
        entry, kw, _ = p.values
        seen.add((entry.make(I, H, **kw) if entry.spatial is None else entry.make(CONV_C, CONV_H, **kw))
                 .cell_spec.fusable)
    assert seen == set(KERNELS), f"families without a NaN test: {set(KERNELS) - seen}"


def _pair(entry, kw, dtype):
    """The same layer (equal parameters) on backends 'fused' and 'reference', and an input."""
    torch.manual_seed(0)
    h_in, hidden = (I, H) if entry.spatial is None else (CONV_C, CONV_H)
    fused = entry.make(h_in, hidden, backend="fused", dtype=dtype, **kw)
    ref = entry.make(h_in, hidden, backend="reference", dtype=dtype, **kw)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _input(entry, seq, batch, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = entry.input_shape(seq, batch, I if entry.spatial is None else CONV_C)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _states(module, x, seed=2):
    """Random initial states of the module's state shapes (0.5 scale)."""
    with torch.no_grad():
        _, h = module(x)
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s.shape, generator=g, dtype=torch.float64) * 0.5).to(s.dtype) for s in flatten_states(h)]


def _run(module, x, hx, lengths=None):
    """Outputs, final states and, after ``(out.sum() + sum of final states).backward()``, the
    gradients of the input, the initial states and every parameter (by name)."""
    module.zero_grad()
    xi = x.clone().requires_grad_()
    hxi = [h.clone().requires_grad_() for h in hx]
    out, h_n = module(xi, tuple(hxi) if len(hxi) > 1 else hxi[0], lengths=lengths)
    states = flatten_states(h_n)
    (out.sum() + sum(s.sum() for s in states)).backward()
    grads = {"input": xi.grad, **{f"state0[{i}]": h.grad for i, h in enumerate(hxi)}}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return [out.detach(), *[s.detach() for s in states]], grads


def _compare(a, b, what, problems):
    """a (fused) has NaN and +-Inf exactly where b (reference) has them; float64: values to 1e-10 too."""
    if a is None or b is None:
        if (a is None) != (b is None):
            problems.append(f"{what}: one gradient is None")
        return
    if a.shape != b.shape:
        problems.append(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        return
    for mask, name in ((torch.isnan, "NaN"), (torch.isposinf, "+Inf"), (torch.isneginf, "-Inf")):
        ma, mb = mask(a), mask(b)
        if not torch.equal(ma, mb):
            problems.append(f"{what}: {name} at {int(ma.sum())} places, reference at {int(mb.sum())} "
                            f"({int((ma != mb).sum())} differ)")
            return
    if a.dtype == torch.float64:
        try:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)
        except AssertionError as e:
            problems.append(f"{what}: values differ: {str(e).splitlines()[-1]}")


def _poke(t, value, index=1):
    """t with one element set to value (in place on a parameter, else a copy)."""
    with torch.no_grad():
        t.view(-1)[index] = value
    return t


def _sites(module, hx):
    """Where a bad value goes: one input element (step 0, row 1), one element of each initial
    state (row 1), one element of every parameter."""
    sites = [("input", None)] + [(f"state0[{i}]", i) for i in range(len(hx))]
    return sites + [(name, None) for name, _ in module.named_parameters()]


@pytest.mark.parametrize("entry,kw,dtype", FAMILIES)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_nan_inf_propagate_like_the_reference(entry, kw, dtype, value):
    fused, ref = _pair(entry, kw, dtype)
    x = _input(entry, L, N, dtype)
    hx = _states(fused, x)
    clean = {k: v.clone() for k, v in fused.state_dict().items()}
    problems = []
    for site, idx in _sites(fused, hx):
        fused.load_state_dict(clean)
        ref.load_state_dict(clean)
        xs, hs = x.clone(), [h.clone() for h in hx]
        if site == "input":
            xs[0, 1].view(-1)[1] = value
        elif idx is not None:
            hs[idx][0, 1].view(-1)[1] = value
        else:
            _poke(dict(fused.named_parameters())[site], value)
            _poke(dict(ref.named_parameters())[site], value)
        res_f, grad_f = _run(fused, xs, hs)
        assert fused.last_backend == "fused", fused.last_backend
        res_r, grad_r = _run(ref, xs, hs)
        for k, (a, b) in enumerate(zip(res_f, res_r)):
            _compare(a, b, f"{site}={value}: {'output' if k == 0 else f'final state {k - 1}'}", problems)
        for name in grad_r:
            _compare(grad_f[name], grad_r[name], f"{site}={value}: grad {name}", problems)
    assert not problems, "\n".join(problems)


def test_two_layers_bidirectional():
    """The reverse direction and a second layer's input (the first layer's NaN output)."""
    problems = []
    for cls in (rnnkit.LSTM, rnnkit.GRU):
        torch.manual_seed(0)
        fused = cls(I, H, num_layers=2, bidirectional=True, backend="fused", dtype=torch.float64)
        ref = cls(I, H, num_layers=2, bidirectional=True, backend="reference", dtype=torch.float64)
        ref.load_state_dict(fused.state_dict())
        x = torch.randn(4, N, I, dtype=torch.float64)
        x[2, 1, 0] = NAN
        hx = _states(fused, x)
        (res_f, grad_f), (res_r, grad_r) = _run(fused, x, hx), _run(ref, x, hx)
        for k, (a, b) in enumerate(zip(res_f, res_r)):
            _compare(a, b, f"{cls.__name__} result {k}", problems)
        for name in grad_r:
            _compare(grad_f[name], grad_r[name], f"{cls.__name__} grad {name}", problems)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ lengths

LENGTHS = torch.tensor([3, 2, 1, 0, 2])  # 5 rows: the kernels' BLAS path (4 rows and more); a zero length


def _per_row_reference(entry, kw, dtype, state, x, hx, lengths, poke=None):
    """The oracle: the reference backend on each row alone, its valid steps only. Returns the
    output (zero past each length), final states and gradients, as _run does for the batch."""
    h_in, hidden = (I, H) if entry.spatial is None else (CONV_C, CONV_H)
    m = entry.make(h_in, hidden, backend="reference", dtype=dtype, **kw)
    m.load_state_dict(state)
    if poke:
        poke(m)
    out_all, finals = None, [h.clone() for h in hx]
    grads = {"input": torch.zeros_like(x), **{f"state0[{i}]": torch.zeros_like(h) for i, h in enumerate(hx)}}
    grads.update({name: torch.zeros_like(p) for name, p in m.named_parameters()})
    for n, ln in enumerate(lengths.tolist()):
        if ln == 0:  # the row is its initial state: d(sum of final states)/d(initial state) = 1
            for i in range(len(hx)):
                grads[f"state0[{i}]"][:, n] = 1
            continue
        res, g = _run(m, x[:ln, n:n + 1], [h[:, n:n + 1] for h in hx])
        if out_all is None:
            out_all = torch.zeros(x.shape[0], x.shape[1], *res[0].shape[2:], dtype=dtype)
        out_all[:ln, n] = res[0][:, 0]
        for i, s in enumerate(res[1:]):
            finals[i][:, n] = s[:, 0]
        grads["input"][:ln, n] = g["input"][:, 0]
        for i in range(len(hx)):
            grads[f"state0[{i}]"][:, n] = g[f"state0[{i}]"][:, 0]
        for name, p in m.named_parameters():
            grads[name] = grads[name] + g[name]
    return [out_all, *finals], grads


def _valid(lengths, like):
    v = torch.arange(like.shape[0]).unsqueeze(1) < lengths.unsqueeze(0)
    return v.view(*v.shape, *([1] * (like.dim() - 2)))


INPUT_PROJECTION = ("weight_ih", "ln_weight_ih", "ln_bias_ih")
"""Parameters of the input projection, which the scans compute in ATen before the op (autograd
differentiates it): its weight gradient multiplies the zero gradient at the padding by the input
there, so a NaN in the padding reaches them whatever the kernel does (see test_nan_past_the_length)."""


def _lengths_families():
    """The families for the per-row oracle: conv in float64 only (ATen's float32 convolution gives a
    NaN weight or input different NaN at the zero padding at batch 1 and at batch 5, so the oracle's
    batch-1 convolutions are not the batch's), bfloat16 for LSTM and GRU."""
    out = []
    for p in FAMILIES:
        entry, kw, dtype = p.values
        if (entry.spatial is not None and (dtype != torch.float64 or len(entry.spatial) > 1)) or \
                (dtype == torch.bfloat16 and entry.name not in ("lstm", "gru")):
            continue
        out.append(p)
    return out


@pytest.mark.parametrize("entry,kw,dtype", _lengths_families())
def test_lengths_against_each_row_alone(entry, kw, dtype):
    """A NaN (and, but for the conv families, an Inf: ATen's convolution backward turns 0 * Inf into
    NaN or not depending on the batch size) at a valid step, in the initial states of a row of
    length 1 and of a zero-length row, and in the recurrent weight: the fused results equal the
    per-row oracle (outputs at valid steps, final states, every gradient) and the batched
    reference's outputs and final states."""
    fused, ref = _pair(entry, kw, dtype)
    clean = {k: v.clone() for k, v in fused.state_dict().items()}
    x = _input(entry, 3, len(LENGTHS), dtype)
    hx = _states(fused, x)
    values = [NAN] if entry.spatial is not None else [NAN, INF]
    problems = []
    for value in values:
        sites = [("input (t=1, row 1 of length 2)", (1, 1))]
        sites += [(f"state0[{i}] row {r}", (i, r)) for i in range(len(hx)) for r in (2, 3)]
        sites += [("weight_hh_l0", None)] if value != value else []
        for site, where in sites:
            fused.load_state_dict(clean)
            ref.load_state_dict(clean)
            xs, hs, poke = x.clone(), [h.clone() for h in hx], None
            if site.startswith("input"):
                xs[where].view(-1)[1] = value
            elif site.startswith("state0"):
                hs[where[0]][0, where[1]].view(-1)[1] = value
            else:
                def poke(m, site=site):
                    _poke(dict(m.named_parameters())[site], value)
                poke(fused)
                poke(ref)
            what = f"{site}={value}"
            res_f, grad_f = _run(fused, xs, hs, LENGTHS)
            assert fused.last_backend == "fused", fused.last_backend
            res_r, _ = _run(ref, xs, hs, LENGTHS)
            res_o, grad_o = _per_row_reference(entry, kw, dtype, clean, xs, hs, LENGTHS, poke)
            valid = _valid(LENGTHS, res_f[0])
            _compare(res_f[0], res_r[0], f"{what}: output vs the batched reference", problems)
            _compare(torch.where(valid, res_f[0], 0), res_o[0], f"{what}: output vs each row alone", problems)
            for k in range(1, len(res_f)):
                _compare(res_f[k], res_r[k], f"{what}: final state {k - 1} vs the batched reference", problems)
                _compare(res_f[k], res_o[k], f"{what}: final state {k - 1} vs each row alone", problems)
            for name, g in grad_o.items():
                a = grad_f[name]
                if name == "input":  # the padding's gradient is the input projection's (ATen): zero here
                    a = torch.where(_valid(LENGTHS, a), a, 0)
                _compare(a, g, f"{what}: grad {name} vs each row alone", problems)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("entry,kw,dtype", FAMILIES)
def test_nan_past_the_length(entry, kw, dtype):
    """A NaN in the padding of a row (past its length) poisons nothing: outputs and final states as
    the reference (no NaN), and no gradient the kernels compute has a NaN: the input's at valid
    steps, the initial states', every recurrent parameter's. (The input projection's weight gradient
    does get it: see INPUT_PROJECTION. The batched reference backend's gradients are all NaN here.)"""
    fused, ref = _pair(entry, kw, dtype)
    x = _input(entry, 3, len(LENGTHS), dtype)
    hx = _states(fused, x)
    x[2, 1].view(-1)[0] = NAN  # row 1 has length 2
    x[0, 3].view(-1)[1] = NAN  # row 3 has length 0
    res_f, grad_f = _run(fused, x, hx, LENGTHS)
    assert fused.last_backend == "fused"
    res_r, _ = _run(ref, x, hx, LENGTHS)
    problems = []
    for k, (a, b) in enumerate(zip(res_f, res_r)):
        _compare(a, b, f"result {k}", problems)
        if torch.isnan(a).any():
            problems.append(f"result {k} has a NaN")
    for name, g in grad_f.items():
        if name == "input":
            g = g[_valid(LENGTHS, g).expand_as(g)]
        elif name.startswith(INPUT_PROJECTION):
            continue
        if torch.isnan(g).any():
            problems.append(f"grad {name} has {int(torch.isnan(g).sum())} NaN")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ single-step cells

CELLS = {
    "lstm": (rnnkit.LSTMCell, {}),
    "gru": (rnnkit.GRUCell, {}),
    "rnn_tanh": (rnnkit.RNNCell, {}),
    "rnn_relu": (rnnkit.RNNCell, {"nonlinearity": "relu"}),
}


def _cells(name, dtype):
    cls, kw = CELLS[name]
    torch.manual_seed(0)
    fused = cls(I, H, dtype=dtype, backend="fused", **kw)
    ref = cls(I, H, dtype=dtype, backend="reference", **kw)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _direct_reason(cell, x, hx):
    """Why the direct entry declines this call (None: it runs it)."""
    entry = _build._state["module"].cell_step_reason
    return entry(fc.DIRECT_KIND.get(cell.cell_spec.fusable), x, hx, cell._parameters, cell.input_size,
                 cell.hidden_size)


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 5], ids=["batch1", "batch5"])  # the shared-pass gemv / the BLAS path
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_cell_step(name, dtype, batch, value):
    """The direct entry (inference), the ``*_cell`` op it shares its kernel with, and the
    differentiable step (the sequence op on one step), against the reference cell."""
    fused, ref = _cells(name, dtype)
    clean = {k: v.clone() for k, v in fused.state_dict().items()}
    nstates = 2 if name == "lstm" else 1
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(batch, I, generator=g, dtype=dtype)
    h0 = [torch.randn(batch, H, generator=g, dtype=dtype) for _ in range(nstates)]
    ops = torch.ops.rnnkit_fused
    problems = []
    sites = ["input"] + [f"state[{i}]" for i in range(nstates)] + [n for n, _ in fused.named_parameters()]
    for site in sites:
        fused.load_state_dict(clean)
        ref.load_state_dict(clean)
        x, hs = x0.clone(), [h.clone() for h in h0]
        if site == "input":
            x[0, 1] = value
        elif site.startswith("state"):
            hs[int(site[6])][0, 1] = value
        else:
            _poke(dict(fused.named_parameters())[site], value)
            _poke(dict(ref.named_parameters())[site], value)
        hx = tuple(hs) if nstates == 2 else hs[0]
        what = f"{name} {site}={value}"
        with torch.no_grad():
            assert _direct_reason(fused, x, hx) is None
            got = flatten_states(fused(x, hx))
            assert fused.last_backend == "fused"
            want = flatten_states(ref(x, hx))
            p = dict(fused.named_parameters())
            args = (p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
            if name == "lstm":
                via_op = list(ops.lstm_cell(x, hs[0], hs[1], *args))
            elif name == "gru":
                via_op = [ops.gru_cell(x, hs[0], *args)]
            else:
                via_op = [ops.rnn_cell(x, hs[0], *args, 0 if name == "rnn_tanh" else 1)]
        for k, (a, b, c) in enumerate(zip(got, want, via_op)):
            _compare(a, b, f"{what}: direct entry, state {k}", problems)
            _compare(c, b, f"{what}: {name}_cell op, state {k}", problems)
        # with a gradient: the fused sequence op on one step
        results = []
        for m in (fused, ref):
            m.zero_grad()
            xi, hi = x.clone().requires_grad_(), [h.clone().requires_grad_() for h in hs]
            new = flatten_states(m(xi, tuple(hi) if nstates == 2 else hi[0]))
            sum(s.sum() for s in new).backward()
            results.append((new, [xi.grad, *[h.grad for h in hi], *[q.grad for q in m.parameters()]]))
        assert fused.last_backend == "fused"
        (nf, gf), (nr, gr) = results
        for k, (a, b) in enumerate(zip(nf, nr)):
            _compare(a.detach(), b.detach(), f"{what}: differentiable step, state {k}", problems)
        for k, (a, b) in enumerate(zip(gf, gr)):
            _compare(a, b, f"{what}: differentiable step, grad {k}", problems)
    assert not problems, "\n".join(problems)


def test_unbatched_direct_step():
    """A 1-D input and state through the direct entry."""
    problems = []
    for name in CELLS:
        fused, ref = _cells(name, torch.float32)
        x = torch.randn(I)
        x[2] = NAN
        h = torch.randn(H)
        hx = (h, torch.randn(H)) if name == "lstm" else h
        with torch.no_grad():
            assert _direct_reason(fused, x, hx) is None
            for k, (a, b) in enumerate(zip(flatten_states(fused(x, hx)), flatten_states(ref(x, hx)))):
                _compare(a, b, f"{name} state {k}", problems)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ wrong shapes

SHAPE_SWEEP = textwrap.dedent(r'''
    import torch
    import rnnkit
    from rnnkit.fused import _ops, load

    assert load() is None
    _ops.register()
    torch.set_num_threads(1)
    ops = torch.ops.rnnkit_fused
    g = torch.Generator().manual_seed(0)


    def R(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)


    def cases():
        """(name, op, valid arguments, notes): notes name the arguments whose perturbation may be
        valid: 'fwd' (a forward's xp: one more step is a longer sequence), 'kernel' (a conv weight:
        a shorter kernel is still a kernel), 'unused' (lstm_bwd's ms without w_hr)."""
        L, N, H, I, P = 3, 2, 4, 3, 2
        lengths = torch.tensor([3, 1])
        for dt in (torch.float32, torch.bfloat16):
            tag = "" if dt == torch.float32 else "[bf16]"
            xp, w, h0 = R(L, N, H, dtype=dt), R(H, H, dtype=dt), R(N, H, dtype=dt)
            out, hn = ops.rnn_fwd(xp, w, h0, lengths, 0)
            yield "rnn_fwd" + tag, ops.rnn_fwd, [xp, w, h0, lengths, 1], {"fwd": 0}
            yield "rnn_bwd" + tag, ops.rnn_bwd, [torch.ones_like(out), torch.ones_like(hn), w, h0, lengths, out, 1], {}
            for proj in (False, True):
                Hout = P if proj else H
                xp, w, c0 = R(L, N, 4 * H, dtype=dt), R(4 * H, Hout, dtype=dt), R(N, H, dtype=dt)
                w_hr, h0 = (R(P, H, dtype=dt) if proj else None), R(N, Hout, dtype=dt)
                out, hn, cn, gates, cs, ms = ops.lstm_fwd(xp, w, w_hr, h0, c0, lengths)
                name = "lstm" + ("_proj" if proj else "")
                yield name + "_fwd" + tag, ops.lstm_fwd, [xp, w, w_hr, h0, c0, lengths], {"fwd": 0}
                yield name + "_bwd" + tag, ops.lstm_bwd, [torch.ones_like(out), torch.ones_like(hn), torch.ones_like(cn),
                                                         w, w_hr, h0, c0, lengths, out, gates, cs, ms], \
                    ({} if proj else {"unused": 11})
            xp, w, b, h0 = R(L, N, 3 * H, dtype=dt), R(3 * H, H, dtype=dt), R(3 * H, dtype=dt), R(N, H, dtype=dt)
            out, hn, rzn, hns = ops.gru_fwd(xp, w, b, h0, lengths)
            yield "gru_fwd" + tag, ops.gru_fwd, [xp, w, b, h0, lengths], {"fwd": 0}
            yield "gru_bwd" + tag, ops.gru_bwd, [torch.ones_like(out), torch.ones_like(hn), w, h0, lengths, out, rzn,
                                                 hns], {}
        x, h, c = R(N, I), R(N, H), R(N, H)
        yield "lstm_cell", ops.lstm_cell, [x, h, c, R(4 * H, I), R(4 * H, H), R(4 * H), R(4 * H)], {}
        yield "gru_cell", ops.gru_cell, [x, h, R(3 * H, I), R(3 * H, H), R(3 * H), R(3 * H)], {}
        yield "rnn_cell", ops.rnn_cell, [x, h, R(H, I), R(H, H), R(H), R(H), 1], {}
        xp, w, h0, c0, wc = R(L, N, 4 * H), R(4 * H, H), R(N, H), R(N, H), [R(H), R(H), R(H)]
        out, hn, cn, gates, cs = ops.peephole_fwd(xp, w, *wc, h0, c0, lengths)
        yield "peephole_fwd", ops.peephole_fwd, [xp, w, *wc, h0, c0, lengths], {"fwd": 0}
        yield "peephole_bwd", ops.peephole_bwd, [torch.ones_like(out), torch.ones_like(hn), torch.ones_like(cn), w,
                                                 *wc, h0, c0, lengths, out, gates, cs], {}
        xp, u, h0 = R(L, N, H), R(H), R(N, H)
        out, hn = ops.indrnn_fwd(xp, u, h0, lengths, 1)
        yield "indrnn_fwd", ops.indrnn_fwd, [xp, u, h0, lengths, 1], {"fwd": 0}
        yield "indrnn_bwd", ops.indrnn_bwd, [torch.ones_like(out), torch.ones_like(hn), u, h0, lengths, out, 1], {}
        xp, w, h0, c0, ln = R(L, N, 4 * H), R(4 * H, H), R(N, H), R(N, H), [R(4 * H), R(H), R(H)]
        out, hn, cn, gates, cs, nz, nc, rstd = ops.ln_lstm_fwd(xp, w, *ln, h0, c0, lengths, 1e-5)
        yield "ln_lstm_fwd", ops.ln_lstm_fwd, [xp, w, *ln, h0, c0, lengths, 1e-5], {"fwd": 0}
        yield "ln_lstm_bwd", ops.ln_lstm_bwd, [torch.ones_like(out), torch.ones_like(hn), torch.ones_like(cn), w, *ln,
                                               h0, c0, lengths, out, gates, cs, nz, nc, rstd], {}
        xp, w, h0, gain, shift = R(L, N, 3 * H), R(3 * H, H), R(N, H), R(3 * H), R(3 * H)
        out, hn, gates, nz, rstd = ops.ln_gru_fwd(xp, w, gain, shift, h0, lengths, 1e-5)
        yield "ln_gru_fwd", ops.ln_gru_fwd, [xp, w, gain, shift, h0, lengths, 1e-5], {"fwd": 0}
        yield "ln_gru_bwd", ops.ln_gru_bwd, [torch.ones_like(out), torch.ones_like(hn), w, gain, shift, h0, lengths,
                                             out, gates, nz, rstd], {}
        hid, S, k = 2, 5, 3
        xp, w, h0, c0 = R(L, N, 4 * hid, S), R(4 * hid, hid, k), R(N, hid, S), R(N, hid, S)
        wc = [R(hid, S), R(hid, S), R(hid, S)]
        out, hn, cn, gates, cs = ops.conv_lstm_fwd(xp, w, *wc, h0, c0, lengths)
        yield "conv_lstm_fwd", ops.conv_lstm_fwd, [xp, w, *wc, h0, c0, lengths], {"fwd": 0, "kernel": 1}
        yield "conv_lstm_bwd", ops.conv_lstm_bwd, [torch.ones_like(out), torch.ones_like(hn), torch.ones_like(cn), w,
                                                   *wc, h0, c0, lengths, out, gates, cs], {"kernel": 3}
        xp, w, b, h0 = R(L, N, 3 * hid, S), R(3 * hid, hid, k), R(3 * hid), R(N, hid, S)
        out, hn, rzn, hns = ops.conv_gru_fwd(xp, w, b, h0, lengths)
        yield "conv_gru_fwd", ops.conv_gru_fwd, [xp, w, b, h0, lengths], {"fwd": 0, "kernel": 1}
        yield "conv_gru_bwd", ops.conv_gru_bwd, [torch.ones_like(out), torch.ones_like(hn), w, h0, lengths, out, rzn,
                                                 hns], {"kernel": 2}


    def perturbations(t):
        yield "rank", (t.reshape(-1) if t.dim() >= 2 else t.unsqueeze(0))
        if t.numel():
            yield "0-d", t.reshape(-1)[0].clone()
        yield "extra row", torch.cat([t, t[:1]])
        if t.dim() and t.size(-1) > 1:
            yield "last axis - 1", t[..., :-1].contiguous()
        if t.is_floating_point():
            yield "dtype", t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)


    for name, op, args, notes in cases():
        op(*args)  # the valid call runs
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                continue
            for kind, b in perturbations(a):
                may_run = (notes.get("fwd") == i and kind == "extra row") or \
                    (notes.get("kernel") == i and kind == "last axis - 1") or notes.get("unused") == i or \
                    (a.dtype == torch.int64 and kind == "dtype")
                print(f"{name} argument {i}: {kind}:", end=" ", flush=True)
                try:
                    op(*args[:i], b, *args[i + 1:])
                    res = "ran"
                except RuntimeError:
                    res = "RuntimeError"
                except Exception as e:
                    res = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                print(res if res == "RuntimeError" or (may_run and res == "ran") else f"BAD {res}", flush=True)
    print("DONE", flush=True)
''')


def test_wrong_shapes_raise_runtime_error():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(rnnkit.__file__).parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SHAPE_SWEEP], capture_output=True, text=True, env=env, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"the sweep died (exit {proc.returncode}) at: {lines[-1:]}\n{proc.stderr[-2000:]}"
    assert lines and lines[-1] == "DONE", proc.stdout[-2000:] + proc.stderr[-2000:]
    bad = [line for line in lines if " BAD " in line]
    assert not bad, f"{len(bad)} wrong-shaped calls not rejected with a RuntimeError:\n" + "\n".join(bad)
    assert len(lines) > 300  # the sweep ran every case
