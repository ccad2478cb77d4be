"""Tracing, scripting, compiling and exporting rnnkit layers, as users' tools do:
``torch.jit.trace`` works at other batch sizes; ``torch.jit.script`` says which routes
work; ``torch.compile(fullgraph=True)`` works with ``lengths=``; ``torch.export`` keeps
the batch and the sequence length dynamic for every registered layer on the default backend
(the fused ops, and MinGRU/MinLSTM's parallel scan; the torch op and the reference loop unroll the
time steps, so without the fused kernels the length is static); saved artifacts load and run in a
fresh process after ``import rnnkit``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.export import Dim, export

import rnnkit
from helpers import flatten_states, runnable_backends

BACKENDS = [b for b in ("auto", "torch", "fused", "reference") if b in runnable_backends()]
NAMES = sorted(rnnkit.LAYERS)


def _outputs(result):
    out, h = result
    return [out, *flatten_states(h)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_jit_trace_runs_at_other_batch_sizes(kind, backend):
    torch.manual_seed(0)
    m = getattr(rnnkit, kind)(4, 6, num_layers=2, backend=backend)
    traced = torch.jit.trace(m, torch.randn(5, 16, 4))
    for batch in (1, 3, 64):
        x = torch.randn(5, batch, 4)
        for a, b in zip(_outputs(traced(x)), _outputs(m(x))):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["auto", "fused"])
@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
def test_jit_trace_of_a_cell_runs_at_other_batch_sizes(kind, backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available")
    torch.manual_seed(0)
    cell = getattr(rnnkit, kind)(4, 6, backend=backend)
    traced = torch.jit.trace(cell, torch.randn(16, 4))
    for batch in (1, 5):
        x = torch.randn(batch, 4)
        with torch.no_grad():
            for a, b in zip(flatten_states(traced(x)), flatten_states(cell(x))):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("module", [rnnkit.LSTM(3, 4), rnnkit.GRUCell(3, 4), rnnkit.LayerNormLSTM(3, 4)],
                         ids=["LSTM", "GRUCell", "LayerNormLSTM"])
def test_jit_script_names_the_supported_routes(module):
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile rnnkit's layers and cells.*"
                                           r"torch.jit.trace.*torch.export.export.*torch.compile"):
        torch.jit.script(module)


@pytest.mark.parametrize("name, backend", [(n, b) for n in ("lstm", "gru", "rnn", "layernorm_lstm", "peephole_lstm",
                                                             "indrnn") for b in ("auto", "fused")]
                         + [("gru", "reference")])  # reference: an unrolled loop, slow to compile; one case
def test_compile_fullgraph_with_lengths(name, backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not available")
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = rnnkit.LAYERS[name].make(4, 6, backend=backend, bidirectional=True)
    x, lengths = torch.randn(5, 3, 4), torch.tensor([5, 2, 0])
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(allow_rnn=True):  # needed for torch.nn.RNN/LSTM/GRU (and subclasses)
        got = _outputs(compiled(x, lengths=lengths))
    for a, b in zip(got, _outputs(m(x, lengths=lengths))):
        torch.testing.assert_close(a, b)


def test_compile_without_the_flag_still_runs_like_torch_nn():
    """Dynamo refuses every torch.nn.LSTM (rnnkit's included) without allow_rnn: it graph-breaks
    around the layer and runs it eagerly, as for torch.nn.LSTM itself."""
    torch._dynamo.reset()
    m = rnnkit.LSTM(4, 6)
    x = torch.randn(5, 3, 4)
    compiled = torch.compile(lambda t: m(t)[0].relu(), backend="eager")
    torch.testing.assert_close(compiled(x), m(x)[0].relu())


def _example(name):
    entry = rnnkit.LAYERS[name]
    torch.manual_seed(0)
    module = entry.make(4, 6).eval()
    return module, entry


_EXPORTED = {}


def _dynamic_length(name):
    return "fused" in BACKENDS or name.startswith("min")


def _exported(name):
    """``(module, entry, program)``: layer ``name`` on the default backend exported once per session at
    length 5, batch 3, with the batch and (see :func:`_dynamic_length`) the length dynamic."""
    if name not in _EXPORTED:
        module, entry = _example(name)
        x = torch.randn(entry.input_shape(5, 3, 4))
        dims = {1: Dim("batch", min=1, max=256)}
        if _dynamic_length(name):
            dims[0] = Dim("length", min=2, max=4096)
        _EXPORTED[name] = module, entry, export(module, (x,), dynamic_shapes=(dims,))
    return _EXPORTED[name]


@pytest.mark.parametrize("name", NAMES)
def test_export_with_a_dynamic_batch_and_length(name):
    """Every registered layer on the default backend: the exported program runs at other lengths
    AND batch sizes (both symbolic in the graph) and equals eager."""
    module, entry, ep = _exported(name)
    for length, batch in ((9, 2), (2, 7)) if _dynamic_length(name) else ((5, 2), (5, 7)):
        xi = torch.randn(entry.input_shape(length, batch, 4))
        for a, b in zip(_outputs(ep.module()(xi)), _outputs(module(xi))):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b)


def test_export_with_a_given_state_and_lengths_keeps_batch_and_length_dynamic():
    """The initial state's batch axis is checked against the input's symbolically (no
    specialization), and ``lengths=`` (no data-dependent check) exports too."""
    torch.manual_seed(0)
    m = rnnkit.LSTM(4, 6, num_layers=2).eval()
    batch = Dim("batch")
    dims = {"input": {1: batch, **({0: Dim("length", min=2)} if _dynamic_length("lstm") else {})},
            "hx": ({1: batch}, {1: batch}), "lengths": {0: batch}}
    args = (torch.randn(5, 3, 4), (torch.randn(2, 3, 6), torch.randn(2, 3, 6)))
    ep = export(m, args, {"lengths": torch.tensor([5, 2, 4])}, dynamic_shapes=dims)
    length = 8 if _dynamic_length("lstm") else 5
    x, hx, lengths = torch.randn(length, 4, 4), (torch.randn(2, 4, 6), torch.randn(2, 4, 6)), torch.tensor([3, 0, 5, 1])
    for a, b in zip(_outputs(ep.module()(x, hx, lengths=lengths)), _outputs(m(x, hx, lengths=lengths))):
        torch.testing.assert_close(a, b)


def test_lstm_exports_dynamic_length_on_the_default_backend():
    m = rnnkit.LSTM(4, 6, num_layers=2, bidirectional=True).eval()
    ep = export(m, (torch.randn(5, 3, 4),), dynamic_shapes=({0: Dim("L", min=2), 1: Dim("N")},))
    x = torch.randn(11, 2, 4)
    torch.testing.assert_close(ep.module()(x)[0], m(x)[0])


def test_artifacts_load_and_run_in_a_fresh_process(tmp_path):
    """torch.export.save/load of every layer's program (dynamic length and batch) and a
    torch.jit.trace artifact, loaded in a new interpreter that only imports rnnkit."""
    torch.manual_seed(0)
    m = rnnkit.LSTM(4, 6, backend="fused").eval() if "fused" in BACKENDS else rnnkit.LSTM(4, 6).eval()
    x = torch.randn(7, 2, 4)
    torch.jit.save(torch.jit.trace(m, torch.randn(5, 3, 4)), tmp_path / "lstm.jit")
    io = {"x": x, "want": m(x)[0], "programs": {}}
    for name in NAMES:
        module, entry, ep = _exported(name)
        torch.export.save(ep, tmp_path / f"{name}.pt2")
        xi = torch.randn(entry.input_shape(8 if _dynamic_length(name) else 5, 2, 4))
        with torch.no_grad():
            io["programs"][name] = (xi, _outputs(module(xi)))
    torch.save(io, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, rnnkit
        io = torch.load({str(tmp_path / 'io.pt')!r})
        for name, (x, want) in io["programs"].items():
            out, h = torch.export.load({str(tmp_path)!r} + f"/{{name}}.pt2").module()(x)
            got = [out, *(h if isinstance(h, tuple) else (h,))]
            assert len(got) == len(want), name
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, msg=lambda m: f"{{name}}: {{m}}")
        traced = torch.jit.load({str(tmp_path / 'lstm.jit')!r})
        torch.testing.assert_close(traced(io["x"])[0], io["want"])
        print("ok", len(io["programs"]))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith(f"ok {len(NAMES)}")
