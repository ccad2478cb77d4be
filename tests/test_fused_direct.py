"""The cells' direct single step: the fused extension's CPython entry that
``CellBase.forward`` tries first (skipping the dispatcher for a plain inference
step).

Oracles: torch.nn's cells (outputs), the torch.ops cell ops (the same raw kernel,
so bitwise equal), and the full path's own errors. Every situation the entry must
decline (a gradient, a mode, a transform, a profiler, a subclass, a bad shape...)
is checked twice: the entry's reason, and that the cell still answers as the full
path does (same result, or the same error message)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit.backends import BACKENDS
from rnnkit.fused import _build, cells as fc
from helpers import assert_close, flatten_states

REASON = BACKENDS["fused"].unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")

CELLS = {  # name -> (rnnkit cell, torch.nn cell, kwargs, number of states)
    "lstm": (rnnkit.LSTMCell, torch.nn.LSTMCell, {}, 2),
    "gru": (rnnkit.GRUCell, torch.nn.GRUCell, {}, 1),
    "rnn_tanh": (rnnkit.RNNCell, torch.nn.RNNCell, {}, 1),
    "rnn_relu": (rnnkit.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}, 1),
}


def make(name, h_in=5, hidden=7, bias=True, dtype=torch.float32, seed=0):
    ours_cls, torch_cls, kw, _ = CELLS[name]
    torch.manual_seed(seed)
    ours = ours_cls(h_in, hidden, bias=bias, dtype=dtype, **kw)
    theirs = torch_cls(h_in, hidden, bias=bias, dtype=dtype, **kw)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def state(name, n, hidden=7, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, hidden) if n else (hidden,)
    s = tuple(torch.randn(shape, generator=g, dtype=dtype) for _ in range(CELLS[name][3]))
    return s if len(s) > 1 else s[0]


def reason(cell, x, hx):
    """Why the direct entry declines this call (None: it runs it)."""
    entry = _build._state["module"].cell_step_reason
    return entry(fc.DIRECT_KIND.get(cell.cell_spec.fusable), x, hx, cell._parameters, cell.input_size,
                 cell.hidden_size)


@pytest.fixture(autouse=True, scope="module")
def loaded():
    """The entry is looked up on the first (full-path) step."""
    with torch.no_grad():
        rnnkit.LSTMCell(2, 3)(torch.randn(1, 2))
    assert fc.direct_step is not None and _build.module() is not None


# ------------------------------------------------------------------ the plain step against torch.nn

@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 3, 6, 0], ids=["N1", "N3", "N6", "unbatched"])  # N < 4 and N >= 4 kernels
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("zero_hx", [False, True], ids=["hx", "hxNone"])
def test_direct_step_matches_torch_nn(name, dtype, n, bias, zero_hx):
    ours, theirs = make(name, h_in=13, hidden=11, bias=bias, dtype=dtype)  # sizes off the vector width
    x = torch.randn((n, 13) if n else (13,), dtype=dtype)
    hx = None if zero_hx else state(name, n, 11, dtype)
    with torch.no_grad():
        assert reason(ours, x, hx) is None
        got, want = flatten_states(ours(x, hx)), flatten_states(theirs(x, hx))
    assert ours.last_backend == "fused"
    for u, v in zip(got, want):
        assert_close(u, v, dtype, f"{name} step")
        assert u.is_contiguous() and not u.requires_grad
        inputs = [x, *(flatten_states(hx) if hx is not None else [])]
        assert all(u.data_ptr() != t.data_ptr() for t in inputs)  # fresh outputs


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("n", [1, 6])
def test_direct_step_equals_the_op(name, n):
    """The direct entry and the torch.ops op run one raw kernel: bitwise equal."""
    ours, _ = make(name, h_in=32, hidden=64)
    x, hx = torch.randn(n, 32), state(name, n, 64)
    p = ours._parameters
    ops = torch.ops.rnnkit_fused
    with torch.no_grad():
        got = flatten_states(ours(x, hx))
        args = (p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
        if name == "lstm":
            want = list(ops.lstm_cell(x, *hx, *args))
        elif name == "gru":
            want = [ops.gru_cell(x, hx, *args)]
        else:
            want = [ops.rnn_cell(x, hx, *args, 0 if name == "rnn_tanh" else 1)]
    assert ours.last_backend == "fused"
    for u, v in zip(got, want):
        assert torch.equal(u, v)


def test_inference_mode_takes_the_direct_step():
    ours, theirs = make("lstm")
    x, hx = torch.randn(1, 5), state("lstm", 1)
    with torch.inference_mode():
        assert reason(ours, x, hx) is None
        for u, v in zip(ours(x, hx), theirs(x, hx)):
            assert_close(u, v, torch.float32, "inference_mode")


# ------------------------------------------------------------------ declined: the full path answers

def _same_as_torch(ours, theirs, x, hx, backend):
    got, want = flatten_states(ours(x, hx)), flatten_states(theirs(x, hx))
    assert ours.last_backend == backend
    for u, v in zip(got, want):
        assert_close(u.detach(), v.detach(), torch.float32, "declined step")


def test_declines_when_a_gradient_is_needed():
    ours, theirs = make("lstm")
    x, hx = torch.randn(2, 5), state("lstm", 2)
    assert reason(ours, x, hx) == "a gradient is needed"
    _same_as_torch(ours, theirs, x, hx, "torch")  # auto: the torch op, with autograd
    h, c = ours(x, hx)
    assert h.grad_fn is not None


@pytest.mark.parametrize("what", ["input", "state", "weight"])
def test_declines_non_contiguous(what):
    ours, theirs = make("gru")
    x, hx = torch.randn(5, 2).t(), state("gru", 2)
    if what == "input":
        pass
    elif what == "state":
        x, hx = x.contiguous(), torch.randn(7, 2).t()
    else:
        x = x.contiguous()
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight_hh = torch.nn.Parameter(m.weight_hh.detach().t().contiguous().t())
    with torch.no_grad():
        assert reason(ours, x, hx) == "a tensor is not a plain contiguous CPU tensor"
        _same_as_torch(ours, theirs, x, hx, "fused")  # the op makes it contiguous


def test_declines_tensor_subclass():
    class Sub(torch.Tensor):
        pass
    ours, theirs = make("rnn_tanh")
    x, hx = torch.randn(2, 5).as_subclass(Sub), state("rnn_tanh", 2)
    with torch.no_grad():
        assert reason(ours, x, hx) == "input is not a Tensor (or is a Tensor subclass)"
        _same_as_torch(ours, theirs, x, hx, "fused")


def test_declines_when_disabled_by_environment(monkeypatch):
    ours, theirs = make("lstm")
    x, hx = torch.randn(1, 5), state("lstm", 1)
    monkeypatch.setenv(_build.DISABLE_ENV, "1")
    with torch.no_grad():
        assert reason(ours, x, hx) == "disabled by RNNKIT_DISABLE_FUSED"
        _same_as_torch(ours, theirs, x, hx, "torch")
    monkeypatch.setenv(_build.DISABLE_ENV, "0")  # "0" keeps it on, as _build.disabled() reads it
    with torch.no_grad():
        assert reason(ours, x, hx) is None


def test_declines_under_autocast():
    ours, _ = make("lstm")
    x, hx = torch.randn(1, 5), state("lstm", 1)
    with torch.no_grad(), torch.autocast("cpu"):
        assert reason(ours, x, hx) == "a tensor is not a plain contiguous CPU tensor"


def test_declines_under_the_profiler_which_then_sees_the_op():
    ours, theirs = make("lstm")
    x, hx = torch.randn(1, 5), state("lstm", 1)
    with torch.no_grad(), torch.profiler.profile() as prof:
        assert reason(ours, x, hx) == "RecordFunction callbacks (a profiler) are active"
        _same_as_torch(ours, theirs, x, hx, "fused")
    assert any(e.name == "rnnkit_fused::lstm_cell" for e in prof.events())


def test_declines_under_a_torch_function_mode():
    from torch.overrides import TorchFunctionMode

    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))
    ours, theirs = make("gru")
    x, hx = torch.randn(1, 5), state("gru", 1)
    with torch.no_grad(), Spy():
        assert reason(ours, x, hx) == "a __torch_function__ mode is active"
        ours(x, hx)
    assert seen  # the mode saw the full path's calls


def test_declines_fake_tensors_and_vmap():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ours, theirs = make("lstm")
    x, hx = torch.randn(1, 5), state("lstm", 1)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        assert reason(ours, x, hx) == "dispatch keys are included by thread-local state (a mode or transform)"
        h, c = ours(x, hx)  # the op's fake implementation
        assert h.shape == (1, 7)
    xs = torch.randn(3, 1, 5)
    with torch.no_grad():
        got = torch.func.vmap(lambda xi: ours(xi, hx)[0])(xs)
        want = torch.stack([theirs(xi, hx)[0] for xi in xs])
    assert_close(got, want, torch.float32, "vmap")


def test_compile_traces_the_op_not_the_entry():
    """torch.compile (fullgraph) traces the full path's op, never the CPython entry."""
    ours, theirs = make("lstm")
    x, hx = torch.randn(1, 5), state("lstm", 1)
    compiled = torch.compile(lambda a, b: ours(a, b), backend="eager", fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x, hx), theirs(x, hx)
    for u, v in zip(got, want):
        assert_close(u, v, torch.float32, "compiled step")


def test_backend_torch_and_reference_skip_it():
    for backend in ("torch", "reference"):
        ours, theirs = make("lstm")
        ours.backend = backend
        with torch.no_grad():
            _same_as_torch(ours, theirs, torch.randn(1, 5), state("lstm", 1), backend)


def test_without_the_entry_the_op_runs(monkeypatch):
    """A process where another copy registered the ops has no entry: the op path runs."""
    monkeypatch.setattr(fc, "direct_step", None)
    monkeypatch.setitem(_build._state, "module", None)
    ours, theirs = make("gru")
    with torch.no_grad():
        _same_as_torch(ours, theirs, torch.randn(2, 5), state("gru", 2), "fused")


# ------------------------------------------------------------------ declined: the full path's errors

@pytest.mark.parametrize("case,exc,match,why", [
    ("feature", ValueError, r"LSTMCell\(input_size=5, hidden_size=7\): input of shape \(1, 4\) was read as "
     r"\(N=1, H_in=4\); its feature axis \(the last\) must equal input_size=5",
     "input's last axis is not input_size"),
    ("dim", ValueError, r"input must be 2-D \(N, H_in\) or 1-D \(H_in,\) unbatched, got 3-D input",
     "input is not 1-D or 2-D"),
    ("state_shape", ValueError, r"c has shape \(1, 6\) but expected \(1, 7\)", "a state's shape"),
    ("hx_arity", TypeError, r"hx must be a tuple \(h, c\), got a tuple of 3", "hx does not hold 2 states"),
    ("dtype", TypeError, r"input has dtype torch.float64 but the parameters are torch.float32",
     "the tensors' dtypes differ"),
    ("not_tensor", TypeError, r"input must be a Tensor, got list", "input is not a Tensor (or is a Tensor subclass)"),
    ("empty", None, None, "empty batch"),
])
def test_declined_bad_input_keeps_the_full_paths_error(case, exc, match, why):
    ours, _ = make("lstm")
    h, c = state("lstm", 1)
    x, hx = torch.randn(1, 5), (h, c)
    if case == "feature":
        x = torch.randn(1, 4)
    elif case == "dim":
        x = torch.randn(1, 1, 5)
    elif case == "state_shape":
        hx = (h, torch.randn(1, 6))
    elif case == "hx_arity":
        hx = (h, c, c)
    elif case == "dtype":
        x = x.double()
    elif case == "not_tensor":
        x = [[0.0] * 5]
    elif case == "empty":
        x, hx = torch.randn(0, 5), (torch.zeros(0, 7), torch.zeros(0, 7))
    with torch.no_grad():
        assert reason(ours, x, hx) == why
        if exc is None:
            h1, c1 = ours(x, hx)  # the full path handles an empty batch
            assert h1.shape == (0, 7) and c1.shape == (0, 7)
        else:
            with pytest.raises(exc, match=match):
                ours(x, hx)


# ------------------------------------------------------------------ how the entry reads a Tensor object

class _Sub(torch.Tensor):
    pass


def _tensor_objects():
    base = torch.randn(4, 6, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(3, 2))
    return {"float32": torch.randn(3), "float64 matrix": base, "view": base[1:, ::2], "transposed": base.t(),
            "0-d": torch.tensor(2.0), "empty": torch.empty(0, 5), "int64": torch.arange(5),
            "requires_grad": torch.randn(2, requires_grad=True), "Parameter": w, "Parameter's grad-free view": w.detach(),
            "module weight": torch.nn.Linear(2, 3).weight, "non-leaf": torch.randn(2, requires_grad=True) * 2}


@pytest.mark.parametrize("what", list(_tensor_objects()))
def test_the_entry_reads_the_at_tensor_that_torch_holds(what):
    """cell_py.cpp reads a Tensor object's at::Tensor as torch lays it out (a PyObject header, then the
    at::Tensor), without torch's Python headers; oracle: torch's own Tensor._cdata (its TensorImpl's address)."""
    t = _tensor_objects()[what]
    check = _build._state["module"]._tensor_layout_reason
    assert check(t, t._cdata) is None
    wrong = "the at::Tensor after a Tensor object's PyObject header is not its tensor"
    assert check(t, t._cdata + 8) == wrong and check(t, 0) == wrong


@pytest.mark.parametrize("obj", [_Sub(torch.randn(2)), [1.0], None, torch.nn.Linear(2, 3)],
                         ids=["subclass", "list", "None", "module"])
def test_the_layout_check_takes_exact_tensors_only(obj):
    assert _build._state["module"]._tensor_layout_reason(obj, 0) == \
        "the object is not a torch.Tensor or torch.nn.Parameter"


def test_the_layout_check_names_its_arguments():
    check = _build._state["module"]._tensor_layout_reason
    with pytest.raises(TypeError, match=r"_tensor_layout_reason\(\) takes 2 arguments \(tensor, impl_address\), got 1"):
        check(torch.randn(2))
    with pytest.raises(TypeError):
        check(torch.randn(2), "not an address")


def test_a_torch_with_another_tensor_layout_fails_the_import():
    """The load verifies the layout on a Tensor torch wraps: a mismatch (simulated) fails the module's
    import with an ImportError naming it, which the loader reports as the fused backend's reason,
    instead of running on a misread Tensor. (Without the simulation this process loaded it.)"""
    env = dict(os.environ, RNNKIT_FUSED_TEST_LAYOUT_MISMATCH="1")
    load = "from rnnkit.fused import _build\nprint('REASON:', _build.load())\n"
    run = subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "REASON: building the C++ extension failed: rnnkit's fused extension (cell_py.cpp) does not match this " \
           "torch's Tensor objects: the at::Tensor after a Tensor object's PyObject header is not its tensor" \
           in run.stdout, run.stdout + run.stderr
