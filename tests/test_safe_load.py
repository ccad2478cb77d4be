"""Whole-model save and safe load behave as torch.nn's: ``torch.save(model, f)``, then
``torch.load(f)`` (``weights_only=True``) with the module's class allowed, gives a
module that computes bit for bit what the saved one computed.

Every registered layer and cell (``rnnkit.LAYERS``, standard and zoo) is saved on
every backend that can run it, plain, with its options, with the regularizers and
with each named nonlinearity; the pickle may name only the module's class and what
a pickled ``torch.nn.LSTM`` names.
"""

from __future__ import annotations

import copy
import copyreg
import dataclasses
import inspect
import io
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import rnnkit
from rnnkit.backends import AUTO_CHOICE, why_not
from rnnkit.cells import CellBase
from rnnkit.functional import ACTIVATIONS

BACKEND_NAMES = ("reference", "torch", "fused", "auto")
HIDDEN = 4
INPUT = 3
ENTRIES = [e for e in rnnkit.LAYERS.values() if e.layer.__module__.startswith("rnnkit.")]

# constructor options beyond the registry's kwargs, each kept where the class takes it
OPTIONS = {"layer_norm_eps": 1e-3, "recurrent_max_abs": 2.0, "parallel": False, "peephole": True, "stride": 2,
           "dilation": 2, "proj_size": 2, "batch_first": True, "bias": False}
REGULARIZERS = {"recurrent_dropout": 0.25, "zoneout": 0.1, "zoneout_cell": 0.2, "weight_drop": 0.3}


# ----------------------------------------------------------------------------- helpers


def pickle_globals(data: bytes) -> set:
    """Every GLOBAL named by the ``data.pkl`` inside a ``torch.save`` zip (protocol 2)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    found = set()
    for op, arg, _ in pickletools.genops(pkl):
        assert op.name != "STACK_GLOBAL", "torch.save writes protocol 2 (GLOBAL only)"
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return found


def saved(module) -> bytes:
    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()


def safe_load(data: bytes, allow):
    with torch.serialization.safe_globals(list(allow)):
        return torch.load(io.BytesIO(data), weights_only=True)


def qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


NN_LSTM_GLOBALS = pickle_globals(saved(nn.LSTM(INPUT, HIDDEN))) - {qualname(nn.LSTM)}
"""What a pickled torch.nn.LSTM names besides its class (tensors, OrderedDict, set)."""

PLAIN = (type(None), bool, int, float, str)


def assert_plain(value, where="state"):
    """Only plain Python values and tensors, down to the leaves (exact types: no
    numpy scalars, dataclasses, functions, dtype or device objects)."""
    if isinstance(value, torch.Tensor):
        return
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            assert_plain(k, f"{where} key")
            assert_plain(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple, set):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
        return
    assert type(value) in PLAIN, f"{where} holds {type(value).__module__}.{type(value).__name__}: {value!r}"


def outputs(m, x):
    """Every tensor ``m`` returns on ``x``, with autograd on and off (the cells take
    another path without it)."""
    out = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y = m(x)
        for t in y if isinstance(y, tuple) else (y,):  # output, then h (or (h, c)); a cell: h or (h, c)
            out += [s.detach() for s in (t if isinstance(t, tuple) else (t,))]
    return out


def _takes(cls, name) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def _builds(cls, args, kwargs) -> bool:
    try:
        cls(*args, **kwargs)
        return True
    except (TypeError, ValueError):
        return False


def _kept(cls, base, candidates):
    """The candidates that ``cls`` takes and accepts, each tried alone (with ``base``)."""
    return {k: v for k, v in candidates.items()
            if _takes(cls, k) and _builds(cls, (INPUT, HIDDEN), {**base, k: v})}


def _cases():
    """(id, entry, 'layer' or 'cell', kwargs) for every registered class and variant."""
    cases = []
    for e in ENTRIES:
        for kind, cls in (("layer", e.layer), ("cell", e.cell)):
            if cls is None:
                continue
            base = dict(e.kwargs)
            variants = {"plain": {}}
            options = _kept(cls, base, OPTIONS)
            if kind == "layer":
                options.update(num_layers=2, bidirectional=True)
            variants["options"] = options
            regs = _kept(cls, base, REGULARIZERS)
            if regs:
                variants["regularized"] = {**regs, "num_layers": 2, "bidirectional": True}
            if _takes(cls, "nonlinearity"):
                variants.update({f"nonlinearity_{name}": {"nonlinearity": name} for name in ACTIVATIONS})
            for vname, kw in variants.items():
                cases.append((f"{e.name}-{kind}-{vname}", e, kind, {**base, **kw}))
    return cases


CASES = _cases()


def build(entry, kind, kwargs, backend, seed=0):
    """A module in eval mode and its input; skips when ``backend`` cannot run it."""
    torch.manual_seed(seed)
    cls = entry.layer if kind == "layer" else entry.cell
    if kind == "layer":
        x = torch.randn(entry.input_shape(5, 2, INPUT, batch_first=kwargs.get("batch_first", False)))
        probe = cls(INPUT, HIDDEN, **kwargs)
        reason = why_not(backend, probe, x) if backend != "auto" else None
        if reason is not None:
            pytest.skip(f"{backend}: {reason}")
    else:
        x = torch.randn((2, INPUT) + tuple(entry.spatial or ()))
    torch.manual_seed(seed)
    try:
        m = cls(INPUT, HIDDEN, **kwargs, backend=backend)
    except ValueError as err:  # a cell refuses a backend that cannot run it at construction
        pytest.skip(f"{backend}: {err}")
    with torch.no_grad():  # nonzero weights everywhere (the LN shifts and gains start at 0 and 1)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval(), x


# ----------------------------------------------------------------------------- the round trip


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_save_then_safe_load_with_only_the_class_allowed(case, backend):
    _, entry, kind, kwargs = case
    m, x = build(entry, kind, kwargs, backend)
    assert m._make_spec() is m.cell_spec  # __init__ and unpickling build the same spec
    before = outputs(m, x)
    assert_plain(m.__getstate__())
    data = saved(m)
    assert pickle_globals(data) <= NN_LSTM_GLOBALS | {qualname(type(m))}
    loaded = safe_load(data, [type(m)])  # exactly what a program allows for torch.nn.LSTM
    assert type(loaded) is type(m) and not loaded.training
    assert loaded.cell_spec is m.cell_spec
    skip = {"_parameters", "_buffers", "_modules", "cell_spec", AUTO_CHOICE}  # auto's choice: made again
    assert AUTO_CHOICE not in loaded.__dict__
    assert set(loaded.__dict__) - skip == set(m.__dict__) - skip
    assert {k: v for k, v in loaded.__dict__.items() if k not in skip} == \
        {k: v for k, v in m.__dict__.items() if k not in skip}
    for (k1, v1), (k2, v2) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    after = outputs(loaded, x)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert loaded.last_backend == m.last_backend
    if kind == "layer" and "regularized" in case[0] and why_not(backend, m.train(), x) is None:
        # training mode: the same masks from the same seed, so the rates came back too
        torch.manual_seed(1)
        before = outputs(m, x)
        torch.manual_seed(1)
        after = outputs(loaded.train(), x)
        assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_lstm_pickle_names_what_torch_nn_lstm_names():
    """Before this format a saved LSTM also named rnnkit.spec.CellSpec,
    rnnkit.functional.lstm_step and rnnkit.functional.linear_project."""
    ours = pickle_globals(saved(rnnkit.LSTM(INPUT, HIDDEN, 2, bidirectional=True, zoneout=0.1, weight_drop=0.2)))
    assert ours - {"rnnkit.layers.LSTM"} == NN_LSTM_GLOBALS
    # a saved RNN named builtins.getattr, functools.partial and torch._C._VariableFunctionsClass
    for nonlinearity in ("tanh", "identity", torch.tanh, torch.nn.functional.gelu):
        assert pickle_globals(saved(rnnkit.RNN(INPUT, HIDDEN, nonlinearity=nonlinearity))) - {"rnnkit.layers.RNN"} \
            == NN_LSTM_GLOBALS


def test_get_unsafe_globals_names_only_rnnkit_classes(tmp_path):
    """What torch reports as not allowed by default: the saved classes, all in safe_globals()."""
    modules = [e.make(INPUT, HIDDEN) for e in ENTRIES] + [e.cell(INPUT, HIDDEN, **e.kwargs) for e in ENTRIES]
    modules.append(rnnkit.RNN(INPUT, HIDDEN, nonlinearity="identity"))
    path = tmp_path / "all.pt"
    torch.save(nn.ModuleList(modules), path)
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    allowed = {qualname(c) for c in rnnkit.safe_globals()}
    assert unsafe - {qualname(nn.ModuleList)} <= allowed
    assert {qualname(type(m)) for m in modules} <= allowed


def test_safe_globals_lists_every_registered_class_and_only_rnnkits():
    classes = rnnkit.safe_globals()
    assert len(classes) == len(set(classes))
    for e in ENTRIES:
        assert e.layer in classes and e.cell in classes
    assert all(c.__module__.startswith("rnnkit.") and not c.__name__.startswith("_") for c in classes)
    assert rnnkit.RecurrentBase not in classes and CellBase not in classes
    with torch.serialization.safe_globals(classes):  # the context manager takes the list as it is
        m = rnnkit.ConvGRU3d(2, 3, 3)
        assert type(torch.load(io.BytesIO(saved(m)))) is rnnkit.ConvGRU3d


# ----------------------------------------------------------------------------- a fresh process

# run both here (to record) and in the fresh process (to compare)
_CHILD = r'''
import sys
import torch
import rnnkit

torch.set_num_threads(int(sys.argv[2]))
torch.serialization.add_safe_globals(rnnkit.safe_globals())
cases = torch.load(sys.argv[1] + "/expected.pt")  # tensors only
bad = []
for name, case in cases.items():
    m = torch.load(f"{sys.argv[1]}/{name}.pt")  # torch's default: weights_only=True
    got = outputs(m, case["x"])
    if len(got) != len(case["out"]) or not all(torch.equal(a, b) for a, b in zip(got, case["out"])):
        bad.append(name)
print("checked", len(cases), "bad", bad)
'''


def _fresh_cases():
    cases = {}
    for name, entry, kind, kwargs in CASES:
        variant = name.split("-", 2)[2]
        if variant in ("options", "regularized") or name in ("rnn-layer-nonlinearity_identity",
                                                                 "rnn-cell-nonlinearity_identity",
                                                                 "indrnn-layer-nonlinearity_gelu"):
            cases[name] = (entry, kind, kwargs)
    return cases


def test_fresh_process_loads_with_weights_only_and_computes_the_same(tmp_path):
    """One python process that imports only rnnkit, allows rnnkit.safe_globals() and
    loads every file with torch.load's default (weights_only=True)."""
    expected = {}
    for name, (entry, kind, kwargs) in _fresh_cases().items():
        m, x = build(entry, kind, kwargs, "auto")
        torch.save(m, tmp_path / f"{name}.pt")
        expected[name] = {"x": x, "out": outputs(m, x)}
    torch.save(expected, tmp_path / "expected.pt")
    src = inspect.getsource(outputs) + _CHILD
    env = {**os.environ, "PYTHONPATH": str(Path(rnnkit.__file__).resolve().parent.parent)}
    run = subprocess.run([sys.executable, "-c", src, str(tmp_path), str(torch.get_num_threads())],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == f"checked {len(expected)} bad []", run.stdout + run.stderr[-3000:]


# ----------------------------------------------------------------------------- nonlinearities


def scaled_tanh(x):
    """A user's activation, pickled by reference."""
    return torch.tanh(0.5 * x)


@pytest.mark.parametrize("cls", [rnnkit.RNN, rnnkit.RNNCell, rnnkit.IndRNN, rnnkit.IndRNNCell])
def test_a_named_function_passed_as_a_callable_is_stored_by_name(cls):
    for name in ACTIVATIONS:
        m = cls(INPUT, HIDDEN, nonlinearity=ACTIVATIONS[name]).eval()
        data = saved(m)
        assert pickle_globals(data) <= NN_LSTM_GLOBALS | {qualname(cls)}
        loaded = safe_load(data, [cls])
        assert loaded.nonlinearity is ACTIVATIONS[name]  # the function itself, not the name
        assert loaded.cell_spec is m.cell_spec
        x = torch.randn(2, INPUT) if "Cell" in cls.__name__ else torch.randn(4, 2, INPUT)
        assert all(torch.equal(a, b) for a, b in zip(outputs(m, x), outputs(loaded, x)))


def test_a_user_callable_is_pickled_by_reference_and_must_be_allowed():
    m = rnnkit.RNN(INPUT, HIDDEN, nonlinearity=scaled_tanh).eval()
    data = saved(m)
    assert f"{__name__}.scaled_tanh" in pickle_globals(data)
    with pytest.raises(pickle.UnpicklingError, match="scaled_tanh"):
        safe_load(data, [rnnkit.RNN])
    loaded = safe_load(data, [rnnkit.RNN, scaled_tanh])
    assert loaded.nonlinearity is scaled_tanh
    x = torch.randn(4, 2, INPUT)
    assert torch.equal(loaded(x)[0], m(x)[0])


def test_a_module_nonlinearity_is_a_submodule_on_load_too():
    """The rebuilt spec uses the loaded PReLU, whose slope was saved and still learns."""
    m = rnnkit.RNN(INPUT, HIDDEN, nonlinearity=nn.PReLU()).eval()
    with torch.no_grad():
        m.nonlinearity.weight.fill_(0.1)
    x = torch.randn(4, 2, INPUT)
    loaded = safe_load(saved(m), [rnnkit.RNN, nn.PReLU])
    assert torch.equal(loaded(x)[0], m(x)[0])
    with torch.no_grad():
        loaded.nonlinearity.weight.fill_(0.9)
    assert not torch.equal(loaded(x)[0], m(x)[0])
    copied = copy.deepcopy(m)
    with torch.no_grad():
        copied.nonlinearity.weight.fill_(0.9)
    assert torch.equal(copied(x)[0], loaded(x)[0]) and not torch.equal(copied(x)[0], m(x)[0])


def test_a_lambda_nonlinearity_copies_but_does_not_pickle():
    def local(v):
        return v * 0.25

    x = torch.randn(4, 2, INPUT)
    for fn in (lambda v: v * 0.5, local):
        m = rnnkit.RNN(INPUT, HIDDEN, nonlinearity=fn)
        for clone in (copy.deepcopy(m), copy.copy(m)):
            assert clone.nonlinearity is fn and torch.equal(clone(x)[0], m(x)[0])
        for dump in (saved, pickle.dumps):
            with pytest.raises(pickle.PicklingError, match=r"RNN: cannot pickle nonlinearity=<function .*a "
                                                           r"callable nonlinearity is pickled by reference.*"
                                                           r"add_safe_globals"):
                dump(m)


# ----------------------------------------------------------------------------- copies, plain pickle


@pytest.mark.parametrize("kind", ["layer", "cell"])
def test_deepcopy_and_plain_pickle(kind):
    for e in ENTRIES:
        m, x = build(e, kind, dict(e.kwargs), "auto")
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert clone.cell_spec is m.cell_spec
            assert all(p1 is not p2 for p1, p2 in zip(clone.parameters(), m.parameters()))
            assert all(torch.equal(a, b) for a, b in zip(outputs(m, x), outputs(clone, x)))


def test_numpy_and_odd_argument_types_are_stored_plain():
    np = pytest.importorskip("numpy")
    modules = [
        rnnkit.LSTM(np.int64(3), np.int64(4), np.int64(2), dropout=np.float64(0.1), zoneout=np.float32(0.1),
                    zoneout_cell=np.float64(0.2), weight_drop=np.float64(0.25), recurrent_dropout=np.float32(0.25)),
        rnnkit.ConvLSTM2d(np.int64(2), np.int64(3), (np.int64(3), np.int64(1)), stride=np.int32(2), peephole=True),
        rnnkit.IndRNN(3, 4, recurrent_max_abs=np.float32(2.0)),
        rnnkit.LayerNormGRU(3, 4, layer_norm_eps=np.float64(1e-3)),
    ]
    for m in modules:
        assert_plain(m.__getstate__())
        assert pickle_globals(saved(m)) <= NN_LSTM_GLOBALS | {qualname(type(m))}


# ----------------------------------------------------------------------------- training after load


def test_training_after_a_safe_load():
    """Gradients reach every parameter and an optimizer step changes the function."""
    torch.manual_seed(0)
    modules = [
        (rnnkit.LSTM(INPUT, HIDDEN, 2, bidirectional=True, recurrent_dropout=0.2, zoneout=0.1, weight_drop=0.3),
         torch.randn(5, 2, INPUT)),
        (rnnkit.RNN(INPUT, HIDDEN, nonlinearity="identity"), torch.randn(5, 2, INPUT)),
        (rnnkit.ConvGRU2d(2, 3, 3), torch.randn(4, 2, 2, 5, 5)),
        (rnnkit.MinLSTM(INPUT, HIDDEN), torch.randn(5, 2, INPUT)),
        (rnnkit.LayerNormLSTMCell(INPUT, HIDDEN), torch.randn(2, INPUT)),
        (rnnkit.GRUCell(INPUT, HIDDEN), torch.randn(2, INPUT)),
    ]
    for m, x in modules:
        loaded = safe_load(saved(m), rnnkit.safe_globals()).train()
        opt = torch.optim.SGD(loaded.parameters(), lr=0.5)
        y = loaded(x)
        if isinstance(loaded, CellBase):  # a second step, so that weight_hh sees a nonzero h
            y = loaded(x, y)
        first = y[0] if isinstance(y, tuple) else y
        (first.square().sum()).backward()
        for name, p in loaded.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{type(m).__name__}.{name}"
        opt.step()
        loaded.eval()
        m.eval()
        y0, y1 = m(x), loaded(x)
        assert not torch.equal(y0[0] if isinstance(y0, tuple) else y0, y1[0] if isinstance(y1, tuple) else y1)


# ----------------------------------------------------------------------------- checkpoints of the previous release


class _OldReleasePickler(pickle.Pickler):
    """Writes a module as the previous release did: it had no ``__getstate__`` of its
    own, so torch.nn.Module's, the whole ``__dict__`` with ``cell_spec`` in it."""

    target = None

    def reducer_override(self, obj):
        if obj is self.target:
            return copyreg.__newobj__, (type(obj),), nn.Module.__getstate__(obj)
        return NotImplemented


class _OldReleasePickle:
    """A ``pickle_module`` for torch.save."""

    Pickler = _OldReleasePickler
    Unpickler = pickle.Unpickler


def _old_checkpoint(m) -> bytes:
    _OldReleasePickler.target = m
    try:
        buf = io.BytesIO()
        torch.save(m, buf, pickle_module=_OldReleasePickle)
        return buf.getvalue()
    finally:
        _OldReleasePickler.target = None


@pytest.mark.parametrize("make, x_shape", [
    (lambda: rnnkit.LSTM(INPUT, HIDDEN, 2, bidirectional=True, proj_size=2, zoneout=0.1), (5, 2, INPUT)),
    (lambda: rnnkit.RNN(INPUT, HIDDEN, nonlinearity="relu"), (5, 2, INPUT)),
    (lambda: rnnkit.LayerNormGRU(INPUT, HIDDEN, layer_norm_eps=1e-3), (5, 2, INPUT)),
    (lambda: rnnkit.MinLSTM(INPUT, HIDDEN, parallel=False), (5, 2, INPUT)),
    (lambda: rnnkit.IndRNNCell(INPUT, HIDDEN, nonlinearity="tanh", recurrent_max_abs=2.0), (2, INPUT)),
    (lambda: rnnkit.ConvLSTM1d(2, HIDDEN, 3, peephole=True), (5, 2, 2, 6)),
], ids=["lstm", "rnn_relu", "layernorm_gru", "minlstm_sequential", "indrnn_cell", "convlstm1d"])
def test_a_checkpoint_of_the_previous_release_loads_with_weights_only_false(make, x_shape):
    torch.manual_seed(0)
    m = make().eval()
    x = torch.randn(x_shape)
    old = _old_checkpoint(m)
    names = pickle_globals(old)
    assert "rnnkit.spec.CellSpec" in names  # the old format: the spec and its functions are pickled
    with pytest.raises(pickle.UnpicklingError, match="CellSpec|rnnkit"):
        safe_load(old, rnnkit.safe_globals())  # why a safe load refuses it: re-save it once
    loaded = torch.load(io.BytesIO(old), weights_only=False)
    assert loaded.cell_spec is m.cell_spec  # rebuilt from the attributes, not the unpickled copy
    assert "_rnnkit_pickle_format" not in loaded.__dict__
    assert all(torch.equal(a, b) for a, b in zip(outputs(m, x), outputs(loaded, x)))
    resaved = safe_load(saved(loaded), [type(m)])
    assert all(torch.equal(a, b) for a, b in zip(outputs(m, x), outputs(resaved, x)))


# ----------------------------------------------------------------------------- specs the class cannot rebuild


def test_a_spec_set_by_hand_is_pickled_and_kept():
    """A spec that ``_make_spec()`` would not give back (here MinGRU without its
    scan) stays in the pickle, so the loaded module computes what the saved one did."""
    m = rnnkit.MinGRU(INPUT, HIDDEN).eval()
    m.cell_spec = dataclasses.replace(m.cell_spec, sequence=None)
    data = saved(m)
    assert "rnnkit.spec.CellSpec" in pickle_globals(data)
    loaded = torch.load(io.BytesIO(data), weights_only=False)
    assert loaded.cell_spec == m.cell_spec and loaded.cell_spec.sequence is None


def test_a_subclass_with_its_own_spec_pickles_it():
    """The docs' recipe for a new cell passes a spec to RecurrentBase; without a
    ``_make_spec()`` the spec is pickled (by reference) and loads with weights_only=False."""
    from rnnkit.functional import LSTM_SPEC

    class Custom(rnnkit.RecurrentBase):
        _is_standard = False

        def __init__(self, *args, **kwargs):
            super().__init__(LSTM_SPEC, *args, **kwargs)

    globals()["Custom"] = Custom  # picklable by reference
    Custom.__qualname__ = "Custom"
    try:
        m = Custom(INPUT, HIDDEN).eval()
        data = saved(m)
        assert "rnnkit.spec.CellSpec" in pickle_globals(data)
        loaded = torch.load(io.BytesIO(data), weights_only=False)
        assert loaded.cell_spec == LSTM_SPEC
        x = torch.randn(5, 2, INPUT)
        assert torch.equal(loaded(x)[0], m(x)[0])
    finally:
        del globals()["Custom"]
