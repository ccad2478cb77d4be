"""Deployment routes (docs/deploy.md): an AOTInductor package of an LSTM model that loads and
runs in a fresh process; the streaming step (:class:`rnnkit.StreamingStep`: one step with its
state in and out) in eager, through torch.export and through torch.onnx.export; and
DistributedDataParallel training over 2 CPU processes (examples/ddp_train.py under torchrun)
equal to one process on the whole batch. Every check compares against eager rnnkit, which the
rest of the suite checks against torch.nn and the reference backend."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch.export import Dim, export

import rnnkit
from helpers import flatten_states, runnable_backends

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(rnnkit.LAYERS)
FUSED = "fused" in runnable_backends()


def _fresh_python(script: str, timeout: int = 300) -> str:
    """Run ``script`` in a new interpreter (rnnkit importable from this checkout); its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


# ----------------------------------------------------------------------------- AOTInductor


class _LSTMTagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnnkit.LSTM(4, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.head(out), h, c


@pytest.mark.skipif(not FUSED, reason="the default backend exports the fused ops; without them the length is static")
def test_aoti_package_of_an_lstm_model_runs_in_a_fresh_process(tmp_path):
    """The default backend's fused ops compile into the package (AOTInductor calls them through
    its proxy executor); a fresh process needs only ``import rnnkit`` (their schemas and kernels)."""
    torch.manual_seed(0)
    model = _LSTMTagger().eval()
    ep = export(model, (torch.randn(3, 5, 4),), dynamic_shapes=({0: Dim("N", min=1, max=64),
                                                                 1: Dim("L", min=2, max=1024)},))
    assert any("rnnkit_fused.lstm_fwd" in str(n.target) for n in ep.graph.nodes), "not the fused op"
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "tagger.pt2"))
    inputs = [torch.randn(2, 9, 4), torch.randn(5, 3, 4)]  # other batches and lengths than exported
    with torch.no_grad():
        torch.save({"inputs": inputs, "want": [model(x) for x in inputs]}, tmp_path / "io.pt")
    out = _fresh_python(f"""
        import torch, rnnkit
        io = torch.load({str(tmp_path / 'io.pt')!r})
        runner = torch._inductor.aoti_load_package({package!r})
        for x, want in zip(io["inputs"], io["want"]):
            got = runner(x)
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert a.shape == b.shape, (a.shape, b.shape)
                torch.testing.assert_close(a, b)
        print("ok")
    """)
    assert out.strip().endswith("ok")


# ----------------------------------------------------------------------------- streaming step


def _module(name, kind, **kwargs):
    entry = rnnkit.LAYERS[name]
    torch.manual_seed(0)
    if kind == "layer":
        return entry.make(4, 6, num_layers=2, **kwargs).eval()
    return entry.cell(4, 6, **{**entry.kwargs, **kwargs}).eval()


def _feature_shape(name):
    spatial = rnnkit.LAYERS[name].spatial
    return (4, *spatial) if spatial else None


def _whole_sequence(module, kind, x):
    """The module on the whole sequence ``x (L, N, ...)``: (outputs per step, final states)."""
    if kind == "layer":
        out, h = module(x)
        return out, flatten_states(h)
    state, outs = None, []
    for x_t in x:
        state = module(x_t, state)
        outs.append(flatten_states(state)[0])
    return torch.stack(outs), flatten_states(state)


def _stream(step_fn, x, state):
    ys = []
    for x_t in x:
        y, *state = step_fn(x_t, *state)
        ys.append(y)
    return torch.stack(ys), state


@pytest.mark.parametrize("kind", ["layer", "cell"])
@pytest.mark.parametrize("name", NAMES)
def test_streaming_step_equals_the_whole_sequence(name, kind):
    module = _module(name, kind)
    step = rnnkit.StreamingStep(module)
    x = torch.randn(rnnkit.LAYERS[name].input_shape(3, 3, 4))
    with torch.no_grad():
        got, state = _stream(step, x, step.initial_state(3, _feature_shape(name)))
        want, want_state = _whole_sequence(module, kind, x)
    torch.testing.assert_close(got, want)
    assert len(state) == len(want_state) == len(step.state_names)
    for a, b in zip(state, want_state):
        torch.testing.assert_close(a, b)


def test_streaming_step_of_a_batch_first_layer_with_a_given_state():
    torch.manual_seed(0)
    gru = rnnkit.GRU(4, 6, num_layers=2, batch_first=True).eval()
    step = rnnkit.StreamingStep(gru)
    x, h0 = torch.randn(3, 7, 4), torch.randn(2, 3, 6)
    with torch.no_grad():
        got, (h,) = _stream(step, x.transpose(0, 1), (h0,))
        want, h_n = gru(x, h0)
    torch.testing.assert_close(got.transpose(0, 1), want)
    torch.testing.assert_close(h, h_n)


# one of each kind of graph: a layer on a fused sequence op (every fusable layer exports so, see
# test_trace_export.py), a layer on plain ops (mingru), a cell on the torch op (lstm), a cell on the
# reference step (a conv cell); the rest are the same code paths
EXPORTED_STEPS = [("lstm", "layer"), ("mingru", "layer"), ("lstm", "cell"), ("convlstm2d", "cell")]


@pytest.mark.parametrize("name, kind", EXPORTED_STEPS, ids=[f"{n}-{k}" for n, k in EXPORTED_STEPS])
def test_exported_streaming_step_equals_the_whole_sequence(name, kind):
    """Exported at batch 2 with a dynamic batch, stepped T times at batch 3 and 1."""
    module = _module(name, kind)
    step = rnnkit.StreamingStep(module)
    features = _feature_shape(name)
    ep = export(step, step.example_inputs(2, features), dynamic_shapes=step.dynamic_shapes())
    names = [spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    assert names == step.input_names[:len(names)] and len(names) == len(step.input_names)
    for batch in (3, 1):
        x = torch.randn(rnnkit.LAYERS[name].input_shape(3, batch, 4))
        with torch.no_grad():
            got, state = _stream(ep.module(), x, step.initial_state(batch, features))
            want, want_state = _whole_sequence(module, kind, x)
        torch.testing.assert_close(got, want)
        for a, b in zip(state, want_state):
            torch.testing.assert_close(a, b)


ONNX_STEPS = [("lstm", "layer", "torch"), ("lstm", "layer", "reference"), ("gru", "cell", "auto"),
              ("lstm", "layer", "auto"), ("layernorm_lstm", "layer", "auto"), ("mingru", "layer", "auto")]


@pytest.mark.parametrize("name, kind, backend", ONNX_STEPS, ids=["-".join(c) for c in ONNX_STEPS])
def test_streaming_step_runs_in_onnx_runtime(tmp_path, name, kind, backend):
    """torch.onnx.export(dynamo=False) of a step of a layer (any backend, the default included:
    rnnkit/onnx.py routes it to ONNX's own operator or a Loop) or cell, stepped in ONNX Runtime at
    another batch size."""
    ort = pytest.importorskip("onnxruntime")
    module = _module(name, kind, backend=backend)
    step = rnnkit.StreamingStep(module)
    path = tmp_path / "step.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(step, step.example_inputs(2), str(path), dynamo=False, input_names=step.input_names,
                          output_names=step.output_names, dynamic_axes=step.dynamic_axes())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == step.input_names
    x = torch.randn(5, 3, 4)

    def run(x_t, *state):
        outs = session.run(None, dict(zip(step.input_names, [t.numpy() for t in (x_t, *state)])))
        return [torch.from_numpy(o) for o in outs]

    got, state = _stream(run, x, step.initial_state(3))
    with torch.no_grad():
        want, want_state = _whole_sequence(module, kind, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(state, want_state):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_streaming_step_refuses_what_cannot_stream():
    with pytest.raises(ValueError, match=r"StreamingStep: LSTM\(input_size=4, hidden_size=6, bidirectional=True\) "
                                         r"is bidirectional and cannot stream"):
        rnnkit.StreamingStep(rnnkit.LSTM(4, 6, bidirectional=True))
    with pytest.raises(TypeError, match=r"StreamingStep: module must be an rnnkit layer .* or cell .*, got LSTM"):
        rnnkit.StreamingStep(torch.nn.LSTM(4, 6))


def test_streaming_step_checks_its_state_arguments():
    lstm_step = rnnkit.StreamingStep(rnnkit.LSTM(4, 6))
    x, h = torch.randn(2, 4), torch.zeros(1, 2, 6)
    with pytest.raises(TypeError, match=r"StreamingStep.forward: LSTM\(input_size=4, hidden_size=6\) takes x_t, h "
                                        r"and c \(its state is \(h, c\)\), got c=None"):
        lstm_step(x, h)
    gru_step = rnnkit.StreamingStep(rnnkit.GRUCell(4, 6))
    with pytest.raises(TypeError, match=r"takes x_t and h only \(its state is \(h\)\), got c=a Tensor"):
        gru_step(x, h[0], h[0])
    with pytest.raises(ValueError, match=r"StreamingStep.state_shapes: ConvLSTM2d\(.*\) is convolutional: pass "
                                         r"feature_shape \(C, \*S\)"):
        rnnkit.StreamingStep(rnnkit.ConvLSTM2d(4, 6, 3)).initial_state(2)
    # a wrong state shape is the wrapped layer's own error
    with pytest.raises(rnnkit.RNNShapeError, match=r"h_0 has shape \(1, 3, 6\)"):
        lstm_step(x, torch.zeros(1, 3, 6), torch.zeros(1, 2, 6))


def test_streaming_step_names_and_shapes():
    step = rnnkit.StreamingStep(rnnkit.LSTM(4, 6, num_layers=3, proj_size=2))
    assert step.input_names == ["x_t", "h", "c"] and step.output_names == ["y_t", "h_out", "c_out"]
    assert step.state_shapes(5) == [(3, 5, 2), (3, 5, 6)]
    assert step.dynamic_axes() == {"x_t": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"},
                                   "y_t": {0: "batch"}, "h_out": {1: "batch"}, "c_out": {1: "batch"}}
    cell = rnnkit.StreamingStep(rnnkit.ConvGRU2dCell(4, 6, 3, stride=2))
    assert cell.state_shapes(2, (4, 7, 8)) == [(2, 6, 4, 4)] and cell.batch_dim == 0


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddp_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """examples/ddp_train.py on 2 CPU processes, gloo on the loopback interface, started the way
    ``torchrun --nproc-per-node 2`` starts them (the same environment variables; torchrun's agent
    process would add a third interpreter start). After training, both ranks hold identical
    parameters, equal to one process trained on the concatenated batch (same seed, same batches)."""
    steps, batch = 4, 6
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    cmd = [sys.executable, str(ROOT / "examples" / "ddp_train.py"), "--steps", str(steps), "--batch", str(batch),
           "--save", str(tmp_path)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}: {err[-3000:]}"
    assert "2 processes, 4 steps: loss" in outs[0][0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between ranks"

    example = _load_example("ddp_train")
    torch.manual_seed(0)
    single = example.Tagger()
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    example.train(single, steps, batch * 2)  # one process, the concatenated batch
    for key, value in single.state_dict().items():
        assert not torch.equal(value, initial[key]), f"{key} did not train"
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
