"""PyTorch's own module data for its six recurrent modules, run against rnnkit.

``torch.testing._internal.common_modules.module_db`` holds a ModuleInfo for
torch.nn.RNN, LSTM, GRU, RNNCell, LSTMCell and GRUCell: constructor arguments
and forward inputs (``module_inputs_func``), and inputs that must fail with a
given exception class and message (``module_error_inputs_func``). For every
backend, each check below builds torch.nn's module and rnnkit's from the same
arguments, gives rnnkit torch.nn's ``state_dict`` and checks what PyTorch's
generic module tests (``test/test_modules.py``) check: values, gradients,
gradcheck, pickling, repr, factory kwargs, ``to``/``to_empty``, non-contiguous
inputs, train/eval, ``state_dict`` keys, and every error input. The checks are
ours; only the data is PyTorch's. CUDA-only checks (cpu/gpu parity, multiple
devices) have no CPU counterpart and are left out.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence

import rnnkit
from rnnkit.backends import why_not
from helpers import weighted_sum

common_modules = pytest.importorskip("torch.testing._internal.common_modules",
                                     reason="PyTorch's module_db needs its test dependencies (expecttest)")

NAMES = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]
INFOS = {info.module_cls.__name__: info for info in common_modules.module_db
         if info.module_cls in tuple(getattr(nn, n) for n in NAMES)}
BACKENDS = ["reference", "torch", "fused", "auto"]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def test_module_db_has_the_six_recurrent_modules():
    assert sorted(INFOS) == sorted(NAMES)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These modules are tiny: one intra-op thread is faster than two waking each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ----------------------------------------------------------------------------- helpers


def samples(name, dtype=torch.float64, requires_grad=True, training=True, packed=False):
    """module_db's ModuleInputs for ``name``; with ``packed``, RNN's and GRU's
    PackedSequence samples too (their ``with_packed_sequence`` flag)."""
    info = INFOS[name]
    extra = {"with_packed_sequence": True} if packed and name in ("RNN", "GRU") else {}
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                   training=training, **extra)


def error_samples(name, dtype=torch.float32):
    info = INFOS[name]
    return info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False, training=True)


def backend_reason(name, backend, args, kwargs):
    """Why ``backend`` cannot run this configuration (rnnkit.backends.why_not), or None."""
    if backend == "auto":
        return None
    probe = getattr(rnnkit, name)(*args, **kwargs, backend="reference")
    return why_not(backend, probe)


def build(name, sample, backend, dtype=torch.float64):
    """torch.nn's module and rnnkit's, same constructor arguments and seed, in ``dtype``;
    rnnkit's loaded with torch.nn's state_dict. Skips where the backend cannot run."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    reason = backend_reason(name, backend, args, kwargs)
    if reason is not None:
        pytest.skip(f"backend={backend!r} cannot run {name}{args}{kwargs}: {reason}")
    torch.manual_seed(0)
    theirs = getattr(nn, name)(*args, **kwargs).to(dtype)
    torch.manual_seed(0)
    ours = getattr(rnnkit, name)(*args, **kwargs, backend=backend).to(dtype)
    their_state = theirs.state_dict()
    assert list(ours.state_dict()) == list(their_state), "state_dict keys (and their order) differ"
    for key, value in ours.state_dict().items():  # the same seed gives the same weights
        assert torch.equal(value, their_state[key]), key
    ours.load_state_dict(their_state)
    return theirs, ours


def clone(obj, noncontiguous=False):
    """A fresh copy of a forward argument (tensor, PackedSequence, tuple), the same
    leaves requiring grad; with ``noncontiguous`` every tensor is a strided view."""
    if isinstance(obj, PackedSequence):
        return PackedSequence(clone(obj.data, noncontiguous), obj.batch_sizes, obj.sorted_indices,
                              obj.unsorted_indices)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().clone()
        if noncontiguous and t.numel() > 1:
            t = torch.stack([torch.zeros_like(t), t], dim=-1).select(-1, 1)
            assert not t.is_contiguous()
        return t.requires_grad_(obj.requires_grad) if t.is_leaf else t.detach().requires_grad_(obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return type(obj)(clone(o, noncontiguous) for o in obj)
    return obj


def leaves(obj):
    """The tensors in a forward argument that require grad, in order."""
    if isinstance(obj, PackedSequence):
        return leaves(obj.data)
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad else []
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in leaves(o)]
    return []


def flat(out):
    """Every tensor of a module's output (a PackedSequence as its data)."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)]


def run(module, sample, noncontiguous=False):
    """Forward on a copy of the sample's input, then the gradients of every input
    leaf and parameter of a weighted sum of the outputs."""
    args = clone(sample.forward_input.args, noncontiguous)
    kwargs = clone(sample.forward_input.kwargs, noncontiguous)
    out = flat(module(*args, **kwargs))
    wrt = leaves(args) + leaves(kwargs) + list(module.parameters())
    grads = torch.autograd.grad(weighted_sum(out), wrt, allow_unused=True) if wrt else ()
    return out, grads


def assert_same(a, b, dtype, what):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and y is None or (x if y is None else y).abs().max() == 0, f"{what}[{i}]"
            continue
        assert x.shape == y.shape, f"{what}[{i}]: shape {tuple(x.shape)} != {tuple(y.shape)}"
        torch.testing.assert_close(x, y, **TOL[dtype], msg=lambda m: f"{what}[{i}]: {m}")


def sample_id(sample):
    c = sample.constructor_input
    return ", ".join([*map(repr, c.args), *(f"{k}={v!r}" for k, v in c.kwargs.items())])


# ----------------------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_gradients_match_torch_nn(name, backend, dtype):
    """module_db's samples: the same outputs (values and shapes) and the same
    gradient for every input and parameter as torch.nn. float64: every sample and
    an eighth of RNN's and GRU's PackedSequence ones; float32: a quarter of the
    layers' samples (they vary over the same flags), every cell sample."""
    checked = 0
    base = list(samples(name, dtype))
    if dtype == torch.float64:
        chosen = base + list(samples(name, dtype, packed=True))[len(base):][::8]
    else:
        chosen = base[::4] if len(base) > 8 else base
    for sample in chosen:
        theirs, ours = build(name, sample, backend, dtype)
        out_t, grads_t = run(theirs, sample)
        out_o, grads_o = run(ours, sample)
        assert_same(out_o, out_t, dtype, f"{name}({sample_id(sample)}) output")
        assert_same(grads_o, grads_t, dtype, f"{name}({sample_id(sample)}) gradient")
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_unbatched_matches_a_batch_of_one(name, backend):
    """module_db's reference functions: an unbatched input gives the batch-of-one output,
    squeezed (every cell sample, every other layer sample)."""
    for sample in list(samples(name, requires_grad=False))[::1 if name.endswith("Cell") else 2]:
        if sample.reference_fn is None or isinstance(sample.forward_input.args[0], PackedSequence):
            continue
        _, ours = build(name, sample, backend)
        expected = flat(sample.reference_fn(ours, *sample.forward_input.args, **sample.forward_input.kwargs))
        assert_same(flat(ours(*sample.forward_input.args, **sample.forward_input.kwargs)), expected,
                    torch.float64, f"{name}({sample_id(sample)})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_inputs(name, backend):
    """Strided (non-contiguous) inputs and states give the same outputs and gradients."""
    for sample in samples(name)[:4]:
        _, ours = build(name, sample, backend)
        out_c, grads_c = run(ours, sample)
        out_n, grads_n = run(ours, sample, noncontiguous=True)
        assert_same(out_n, out_c, torch.float64, "output")
        assert_same(grads_n, grads_c, torch.float64, "gradient")


def _gradcheck_inputs(name, backend, count):
    """``(module, fn, inputs)`` for the first ``count`` samples: ``fn`` maps the input
    leaves and the parameters to the outputs (via functional_call)."""
    cases = []
    for sample in samples(name)[:count]:
        _, ours = build(name, sample, backend)
        args = clone(sample.forward_input.args)
        names = [n for n, _ in ours.named_parameters()]
        params = [p.detach().clone().requires_grad_() for p in ours.parameters()]
        arg_leaves = leaves(args)

        def fn(*tensors, ours=ours, args=args, arg_leaves=arg_leaves, names=names):
            swap = dict(zip(map(id, arg_leaves), tensors[:len(arg_leaves)]))

            def sub(obj):
                if isinstance(obj, torch.Tensor):
                    return swap.get(id(obj), obj)
                if isinstance(obj, (tuple, list)):
                    return type(obj)(sub(o) for o in obj)
                return obj
            out = functional_call(ours, dict(zip(names, tensors[len(arg_leaves):])), sub(args))
            return tuple(flat(out))
        cases.append((fn, tuple(arg_leaves) + tuple(params)))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name, backend):
    """First derivatives against finite differences, float64, for the first two samples."""
    for fn, inputs in _gradcheck_inputs(name, backend, 2):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_gradgradcheck(name, backend):
    """Second derivatives, float64: the reference backend (the one README promises
    double backward on) and PyTorch's op, on the first sample (cells: two). The
    fused kernels' double backward: test_torch_nn_behaviour.py::test_grad_and_gradgrad."""
    for fn, inputs in _gradcheck_inputs(name, backend, 2 if name.endswith("Cell") else 1):
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


# ----------------------------------------------------------------------------- module behaviour


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_pickle_round_trip(name, backend):
    """torch.save / torch.load(weights_only=False) of the whole module: same class, backend, outputs."""
    sample = samples(name, requires_grad=False)[-1]
    _, ours = build(name, sample, backend)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(ours) and loaded.backend == ours.backend
    assert_same(flat(loaded(*sample.forward_input.args)), flat(ours(*sample.forward_input.args)),
                torch.float64, "output after the round trip")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_repr(name, backend):
    for sample in samples(name, requires_grad=False)[:2]:
        theirs, ours = build(name, sample, backend)
        text = repr(ours)
        assert text.startswith(f"{name}(") and f"backend={backend!r}" in text
        # torch.nn's own arguments come first, in torch.nn's words
        assert text[len(name) + 1:].startswith(theirs.extra_repr())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_factory_kwargs(name, backend):
    """``dtype=`` and ``device=`` reach every parameter, as do a ``torch.device`` context,
    ``to_empty`` and ``to`` (also with swap_tensors); the module then runs in that dtype."""
    sample = samples(name, requires_grad=False)[0]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    if backend_reason(name, backend, args, kwargs) is not None:
        pytest.skip(backend_reason(name, backend, args, kwargs))
    cls = getattr(rnnkit, name)
    m = cls(*args, **kwargs, backend=backend, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in m.parameters())
    out = flat(m(*sample.forward_input.args))
    assert all(o.dtype == torch.float64 for o in out)
    meta = cls(*args, **kwargs, backend=backend, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    with torch.device("meta"):
        ctx = cls(*args, **kwargs, backend=backend)
    assert all(p.device.type == "meta" for p in ctx.parameters())
    ctx.to_empty(device="cpu")
    assert all(p.device.type == "cpu" for p in ctx.parameters())
    single = m.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in single.parameters())
    args32 = [a.float() if isinstance(a, torch.Tensor) else tuple(t.float() for t in a)
              for a in sample.forward_input.args]
    assert all(o.dtype == torch.float32 for o in flat(single(*args32)))
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # test_modules' test_to, swap_tensors=True
    try:  # (a module whose outputs are alive cannot swap, in torch.nn as here: the graph holds the weights)
        swapped = cls(*args, **kwargs, backend=backend).to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert all(p.dtype == torch.float64 for p in swapped.parameters())
    assert all(o.dtype == torch.float64 for o in flat(swapped(*sample.forward_input.args)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval(name, backend):
    """train()/eval() set ``training`` on rnnkit's module as on torch.nn's, and eval
    outputs equal torch.nn's (module_db marks the layers train_and_eval_differ)."""
    sample = samples(name, requires_grad=False)[-1]
    theirs, ours = build(name, sample, backend)
    assert ours.training and theirs.training
    theirs.eval(), ours.eval()
    assert not ours.training
    assert_same(flat(ours(*sample.forward_input.args)), flat(theirs(*sample.forward_input.args)),
                torch.float64, "eval output")
    ours.train()
    assert ours.training
    if INFOS[name].train_and_eval_differ:  # they differ through dropout, here 0: same outputs
        assert_same(flat(ours(*sample.forward_input.args)), flat(theirs(*sample.forward_input.args)),
                    torch.float64, "train output")


# ----------------------------------------------------------------------------- errors


def _error_cases():
    cases = []
    for name in NAMES:
        for i, err in enumerate(error_samples(name)):
            cases.append(pytest.param(name, i, id=f"{name}-{i}-{err.error_type.__name__}"))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,index", _error_cases())
def test_error_inputs(name, index, backend):
    """Each module_error_input: rnnkit raises an instance of the expected class with
    a message matching the expected regex, at the same stage (construction or forward)."""
    err = error_samples(name)[index]
    sample = err.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    cls = getattr(rnnkit, name)
    if err.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(err.error_type) as info:
            cls(*args, **kwargs, backend=backend)
    else:
        reason = backend_reason(name, backend, args, kwargs)
        if reason is not None:
            pytest.skip(reason)
        module = cls(*args, **kwargs, backend=backend).to(torch.float32)
        with pytest.raises(err.error_type) as info:
            module(*sample.forward_input.args, **sample.forward_input.kwargs)
    assert re.search(err.error_regex, str(info.value)), (err.error_regex, str(info.value))
