"""ONNX export of every registered layer on the default backend, through both of torch's exporters
(the default, torch.export based one, and ``dynamo=False``), checked in ONNX Runtime against eager.

An ONNX export costs seconds here (the default exporter 3-8 s of CPU per layer), so every layer goes
into one model per group (ONNX's own operators, loops), exported once per exporter (module-scoped
fixtures; the default exporter's by tests/onnx_export_worker.py, in a process of its own while the
suite runs); each layer's test then reads its own outputs. Batch and sequence length are dynamic: ONNX Runtime runs the model at two
other (length, batch) pairs, with ``lengths=`` where a layer takes them.
"""

from __future__ import annotations

import functools
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rnnkit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

IN, HID = 3, 4
EXAMPLE = (5, 3)             # (length, batch) of the example input the exporters trace
RUNS = ((7, 2), (3, 5))      # (length, batch) pairs ONNX Runtime runs
EXPORTERS = ("dynamo", "torchscript")
NATIVE = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU", "peephole_lstm": "LSTM"}
VARIANTS = {  # standard-layer configurations on top of every registered layer's default one
    "lstm-2layer-bidir-batch_first": ("lstm", dict(num_layers=2, bidirectional=True, batch_first=True)),
    "lstm-proj_size-bidir": ("lstm", dict(proj_size=2, bidirectional=True)),
    "gru-2layer-bidir": ("gru", dict(num_layers=2, bidirectional=True)),
    "rnn-relu-bidir-no_bias": ("rnn", dict(nonlinearity="relu", bidirectional=True, bias=False)),
    "layernorm_gru-bidir": ("layernorm_gru", dict(bidirectional=True)),
}
WITH_LENGTHS = ("lstm", "gru", "rnn", "peephole_lstm", "lstm-2layer-bidir-batch_first", "lstm-proj_size-bidir",
                "gru-2layer-bidir", "layernorm_lstm", "mingru", "indrnn", "convgru1d")
NAMES = ["x0", "x1", "x2", "x3", "lengths"]
CASES = {**{name: (name, {}) for name in sorted(rnnkit.LAYERS)}, **VARIANTS}


def _flat(result):
    out, h = result
    return [out, *(h if isinstance(h, tuple) else (h,))]


class AllLayers(nn.Module):
    """Every case of :data:`CASES`; inputs: one sequence per spatial rank, and ``lengths``."""

    def __init__(self, cases, with_lengths=WITH_LENGTHS):
        super().__init__()
        self.with_lengths = with_lengths
        self.names = list(cases)
        self.layers = nn.ModuleList()
        for key in self.names:
            name, kwargs = cases[key]
            self.layers.append(rnnkit.LAYERS[name].make(IN, HID, **kwargs))
        self.slices = {}

    def forward(self, x0, x1, x2, x3, lengths):
        xs = (x0, x1, x2, x3)
        outs = []
        for key, layer in zip(self.names, self.layers):
            spatial = rnnkit.LAYERS[CASES[key][0]].spatial
            x = xs[len(spatial) if spatial else 0]
            if layer.batch_first:
                x = x.transpose(0, 1)
            start = len(outs)
            outs += _flat(layer(x))
            if key in self.with_lengths:
                outs += _flat(layer(x, lengths=lengths))
            self.slices[key] = (start, len(outs))
        return tuple(outs)


def _inputs(length, batch, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(length, batch, IN, *(s or ()), generator=g)
          for s in (None, (5,), (4, 3), (3, 2, 3))]
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length
    return (*xs, lengths)


def _export(model, exporter, path, example=EXAMPLE):
    args = _inputs(*example, seed=0)
    names = NAMES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            L, N = torch.export.Dim("L", min=2, max=4096), torch.export.Dim("N", min=1, max=1024)
            shapes = tuple({0: L, 1: N} for _ in range(4)) + ({0: N},)
            torch.onnx.export(model, args, path, dynamic_shapes=shapes, input_names=names, verbose=False)
        else:
            axes = {n: {0: "L", 1: "N"} for n in names[:4]}
            axes["lengths"] = {0: "N"}
            torch.onnx.export(model, args, path, dynamo=False, input_names=names, dynamic_axes=axes)
    return onnx.load(path)


def _ops(model_proto):
    """Every node's op type, subgraphs (Loop/Scan bodies) included."""
    found = []

    def walk(graph):
        for node in graph.node:
            found.append(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
    walk(model_proto.graph)
    return found


def _group(case):
    name, kwargs = CASES[case]
    return "native" if name in NATIVE and not kwargs.get("proj_size") else "loop"


GROUPS = {g: {c: CASES[c] for c in CASES if _group(c) == g} for g in ("native", "loop")}


def make_group(group):
    torch.manual_seed(0)
    return AllLayers(GROUPS[group]).eval()


def make_mingru():
    torch.manual_seed(0)
    return AllLayers({"mingru": CASES["mingru"]}).eval()


GRAPH_SIZE_LENGTHS = (3, 9)
WORKER = {**{f"{g}_dynamo": (functools.partial(make_group, g), EXAMPLE) for g in GROUPS},
          **{f"mingru_{n}_dynamo": (make_mingru, (n, 3)) for n in GRAPH_SIZE_LENGTHS}}
"""What tests/onnx_export_worker.py exports with the default exporter (name: (model, example (length, batch))),
in a process of its own while the suite runs (conftest.py starts it): that exporter takes 3-8 s of CPU per
layer. ``layernorm_gru-bidir`` (in the loop group) is the regression case of the default exporter's static
batch: its two Scans went through one shared dynamo cache (torch's ``scan()`` wrapper), whose guards from the
forward direction's scan (a static stride 12 = 3 gates x HID) specialized the reverse direction's ``4 * N`` at
the example batch N = 3, so the graph ran at batch 3 only (fixed by calling ``scan_op`` directly,
rnnkit/onnx.py)."""


def _worker_file(config, folder, name, make, example):
    """The worker's export ``name``: its path, once the worker is done, and the model it exported (built here,
    its weights checked against the worker's). Exported here, into ``folder``, when no worker runs (conftest.py
    starts it only when a collected test needs it)."""
    model = make()
    job = getattr(config, "rnnkit_onnx_worker", None)
    if job is None:
        path = str(Path(folder) / f"{name}.onnx")
        _export(model, "dynamo", path, example)
        return path, model
    proc, folder, log = job
    try:
        code = proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "killed after 1800 s"
    if code != 0:
        pytest.fail(f"tests/onnx_export_worker.py failed ({code}); its log:\n{Path(log).read_text()[-4000:]}")
    saved = torch.load(Path(folder) / f"{name}.pt")
    mine = model.state_dict()
    assert saved.keys() == mine.keys() and all(torch.equal(saved[k], mine[k]) for k in mine), \
        f"the worker's {name} model holds other weights than this process's"
    return str(Path(folder) / f"{name}.onnx"), model


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """``get(exporter, group) -> (model, ModelProto, [(inputs, ort outputs, eager outputs)] for each of RUNS)``,
    each exported once (the default exporter's by tests/onnx_export_worker.py)."""
    cache = {}

    def get(exporter, group):
        if (exporter, group) not in cache:
            if exporter == "dynamo":
                path, model = _worker_file(request.config, tmp_path_factory.mktemp("onnx"), f"{group}_dynamo",
                                           *WORKER[f"{group}_dynamo"])
                proto = onnx.load(path)
            else:
                model = make_group(group)
                path = str(tmp_path_factory.mktemp("onnx") / f"{group}_{exporter}.onnx")
                proto = _export(model, exporter, path)
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            runs = []
            for i, (length, batch) in enumerate(RUNS):
                args = _inputs(length, batch, seed=i + 1)
                given = dict(zip(NAMES, args))  # the exporters drop inputs the model does not read
                feeds = {inp.name: given[inp.name].numpy() for inp in session.get_inputs()}
                with torch.no_grad():
                    want = model(*args)
                runs.append((args, session.run(None, feeds), want))
            cache[exporter, group] = model, proto, runs
        return cache[exporter, group]
    return get


def _params(exporters, items):
    return [pytest.param(e, c, id=f"{e}-{c}") for e in exporters for c in items]


@pytest.mark.parametrize("exporter, case", _params(EXPORTERS, CASES))
def test_layer_runs_in_onnxruntime_at_other_batches_and_lengths(exported, exporter, case):
    model, _, runs = exported(exporter, _group(case))
    start, stop = model.slices[case]
    for args, got, want in runs:
        for k in range(start, stop):
            g, w = torch.from_numpy(got[k]), want[k]
            assert g.shape == w.shape, f"{case} ({exporter}) output {k - start}: {tuple(g.shape)} != {tuple(w.shape)}"
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{case} ({exporter}) output {k - start} at L, N = "
                                                     f"{tuple(args[0].shape[:2])}: {m}")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_standard_layers_become_onnx_operators(exported, exporter):
    """RNN/LSTM/GRU and the peephole LSTM are ONNX's own operators (one per layer, both directions in it),
    with ``sequence_lens`` where the layer got ``lengths``, and no loop."""
    model, proto, _ = exported(exporter, "native")
    ops = _ops(proto)
    expected = {"LSTM": 0, "GRU": 0, "RNN": 0, "Loop": 0, "Scan": 0}
    for key in model.names:
        name, kwargs = CASES[key]
        expected[NATIVE[name]] += (2 if key in WITH_LENGTHS else 1) * kwargs.get("num_layers", 1)
    assert {op: ops.count(op) for op in expected} == expected
    with_lens = [n for n in proto.graph.node if n.op_type in expected and len(n.input) > 4 and n.input[4]]
    assert len(with_lens) == sum(CASES[k][1].get("num_layers", 1) for k in WITH_LENGTHS if _group(k) == "native")


@pytest.mark.parametrize("exporter, group", _params(EXPORTERS, GROUPS))
def test_batch_and_length_stay_symbolic_in_the_graph(exported, exporter, group):
    """Every input's length and batch axis is a named dimension of the ONNX graph, not the example's size (the
    default exporter silently retries with a static batch when the model's trace specializes it)."""
    _, proto, _ = exported(exporter, group)
    for inp in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        axes = dims[:1] if inp.name == "lengths" else dims[:2]
        assert all(isinstance(d, str) and d for d in axes), f"{inp.name}: {dims} ({exporter}, {group})"


@pytest.mark.parametrize("exporter, group", _params(EXPORTERS, ["loop"]))
def test_every_other_layer_is_one_loop_per_layer_direction(exported, exporter, group):
    model, proto, _ = exported(exporter, group)
    ops = _ops(proto)
    expected = sum(layer.num_layers * layer.num_directions * (2 if key in model.with_lengths else 1)
                   for key, layer in zip(model.names, model.layers))
    assert ops.count("Loop" if exporter == "torchscript" else "Scan") == expected
    assert not {"LSTM", "GRU", "RNN"} & set(ops)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_graph_size_does_not_depend_on_the_example_length(request, exporter, tmp_path):
    counts = []
    for length in GRAPH_SIZE_LENGTHS:
        if exporter == "dynamo":
            path, _ = _worker_file(request.config, tmp_path, f"mingru_{length}_dynamo",
                                   *WORKER[f"mingru_{length}_dynamo"])
        else:
            path = str(tmp_path / f"{length}.onnx")
            _export(make_mingru(), exporter, path, (length, 3))
        counts.append(len(onnx.load(path).graph.node))
    assert counts[0] == counts[1]


def test_lengths_stay_keyword_only_outside_an_export():
    lstm = rnnkit.LSTM(IN, HID)
    with pytest.raises(TypeError, match=r"LSTM.forward\(\) takes from 2 to 3 positional arguments but 4 were given "
                                        r"\(lengths and padding_value are keyword-only\)"):
        lstm(torch.randn(5, 2, IN), None, torch.tensor([5, 3]))


def test_unbatched_input(tmp_path):
    torch.manual_seed(0)
    lstm = rnnkit.LSTM(IN, HID, num_layers=2).eval()
    path = str(tmp_path / "unbatched.onnx")
    torch.onnx.export(lstm, (torch.randn(5, IN),), path, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "L"}})
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(8, IN)
    got = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = _flat(lstm(x))
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_export_only_ops_compute_onnx_semantics_eagerly(kind, bidirectional):
    """``dynamo=False`` traces ``torch.ops.rnnkit_onnx.*`` eagerly: they equal the layer they stand for."""
    from rnnkit.onnx import _native_stack
    torch.manual_seed(0)
    layer = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU, "rnn": rnnkit.RNN}[kind](IN, HID, 2, bidirectional=bidirectional)
    x, lengths = torch.randn(6, 3, IN), torch.tensor([6, 2, 4])
    D = 2 if bidirectional else 1
    state0 = tuple(torch.randn(2 * D, 3, HID) for _ in range(2 if kind == "lstm" else 1))
    hx = state0 if kind == "lstm" else state0[0]
    with torch.no_grad():
        out, states = _native_stack(layer, kind, x, state0, lengths)
        out = out.masked_fill(~rnnkit.runner.valid_mask(lengths, 6).unsqueeze(-1), 0.0)
        want = _flat(layer(x, hx, lengths=lengths))
    for g, w in zip([out, *states], want):
        torch.testing.assert_close(g, w)


def test_zoneout_in_training_mode_cannot_export():
    lstm = rnnkit.LSTM(IN, HID, zoneout=0.1).train()
    with pytest.raises(RuntimeError, match=r"LSTM\(input_size=3, hidden_size=4\): cannot export recurrent_dropout "
                                           r"or zoneout in training mode.*model.eval\(\)"):
        torch.onnx.export(lstm, (torch.randn(5, 2, IN),), None, dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING)


def test_zoneout_in_eval_mode_exports_its_expectation(tmp_path):
    torch.manual_seed(0)
    gru = rnnkit.GRU(IN, HID, zoneout=0.25).eval()
    path = str(tmp_path / "zoneout.onnx")
    torch.onnx.export(gru, (torch.randn(5, 2, IN),), path, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "L", 1: "N"}})
    assert "Loop" in _ops(onnx.load(path))
    x = torch.randn(7, 3, IN)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = _flat(gru(x))
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-4)


def _export_layer(module, exporter, x, hx):
    """``module`` (an RNN/LSTM/GRU, rnnkit's or torch.nn's) exported as the benchmark exports it: inputs x, h0[, c0],
    length and batch dynamic."""
    import io
    lstm = isinstance(hx, tuple)
    inputs, outputs = (["x", "h0", "c0"], ["y", "hn", "cn"]) if lstm else (["x", "h0"], ["y", "hn"])
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            L, N = torch.export.Dim("L", min=2), torch.export.Dim("N")
            torch.onnx.export(module, (x, hx), buf, input_names=inputs, output_names=outputs,
                              dynamic_shapes=({0: L, 1: N}, ({1: N}, {1: N}) if lstm else {1: N}))
        else:
            axes = {"x": {0: "L", 1: "N"}, "y": {0: "L", 1: "N"}, **{n: {1: "N"} for n in inputs[1:] + outputs[1:]}}
            torch.onnx.export(module, (x, hx), buf, dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes)
    return buf.getvalue()


@pytest.mark.parametrize("exporter, kind, layers, bidirectional", [
    ("torchscript", "lstm", 1, False), ("torchscript", "gru", 1, False), ("torchscript", "rnn", 1, False),
    ("torchscript", "lstm", 2, True), ("torchscript", "gru", 2, True),
    ("dynamo", "lstm", 1, False), ("dynamo", "gru", 1, False), ("dynamo", "lstm", 2, True)])
def test_standard_layer_graph_has_no_node_more_than_torch_nns(exporter, kind, layers, bidirectional):
    """rnnkit's exported RNN/LSTM/GRU has no node that torch.nn's export of the same layer (``dynamo=False``, the
    one that keeps the length dynamic) does not have: ``dynamo=False`` gives the very same node types in the same
    order; the default exporter's graph is a sub-multiset of it (``Constant`` nodes aside: that exporter makes
    constants initializers). Both run in ONNX Runtime at another length and batch and equal torch.nn."""
    torch.manual_seed(0)
    cls = {"lstm": (rnnkit.LSTM, nn.LSTM), "gru": (rnnkit.GRU, nn.GRU), "rnn": (rnnkit.RNN, nn.RNN)}[kind]
    theirs = cls[1](IN, HID, layers, bidirectional=bidirectional).eval()
    ours = cls[0](IN, HID, layers, bidirectional=bidirectional).eval()
    ours.load_state_dict(theirs.state_dict())
    rows = layers * (2 if bidirectional else 1)

    def args(length, batch):
        h = torch.randn(rows, batch, HID)
        return torch.randn(length, batch, IN), ((h, torch.randn(rows, batch, HID)) if kind == "lstm" else h)

    x, hx = args(5, 3)
    protos = {name: _export_layer(m, e, x, hx)
              for name, m, e in (("ours", ours, exporter), ("theirs", theirs, "torchscript"))}
    ops = {name: [n.op_type for n in onnx.load_from_string(p).graph.node] for name, p in protos.items()}
    if exporter == "torchscript":
        assert ops["ours"] == ops["theirs"]
    else:
        from collections import Counter
        ours_ops, theirs_ops = (Counter(op for op in ops[k] if op != "Constant") for k in ("ours", "theirs"))
        assert not ours_ops - theirs_ops, f"nodes torch.nn's export does not need: {ours_ops - theirs_ops}"
    x, hx = args(7, 2)
    with torch.no_grad():
        want = _flat(theirs(x, hx))
    feed = {"x": x.numpy(), "h0": (hx[0] if kind == "lstm" else hx).numpy()}
    if kind == "lstm":
        feed["c0"] = hx[1].numpy()
    got = ort.InferenceSession(protos["ours"], providers=["CPUExecutionProvider"]).run(None, feed)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-4)
