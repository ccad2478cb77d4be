"""Inference: the layers' fast paths (a plain no-grad call through the fused direct layer entry,
any length; else the plain-inference path) and the ``inference`` section of ``rnnkit bench``.

Oracles: torch.nn's layers (values, shapes), the full path's own errors (a call the fast
path declines must answer exactly as before), and a spy on the direct entry (which path ran).
No speed is asserted."""

from __future__ import annotations

import sys

import pytest
import torch

import rnnkit
from rnnkit import bench, bench_inference, cli
from rnnkit.backends import BACKENDS
from helpers import assert_close, flatten_states, spy_layer_run

REASON = BACKENDS["fused"].unavailable()
needs_fused = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")

LAYERS = {  # name -> (rnnkit layer, torch.nn layer, kwargs)
    "lstm": (rnnkit.LSTM, torch.nn.LSTM, {}),
    "gru": (rnnkit.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (rnnkit.RNN, torch.nn.RNN, {}),
    "rnn_relu": (rnnkit.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}


def make(name, h_in=13, hidden=11, dtype=torch.float32, **kw):
    ours_cls, torch_cls, extra = LAYERS[name]
    torch.manual_seed(0)
    theirs = torch_cls(h_in, hidden, dtype=dtype, **extra, **kw)
    ours = ours_cls(h_in, hidden, dtype=dtype, **extra, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def state(name, n, hidden=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    s = tuple(torch.randn(1, n, hidden, generator=g, dtype=dtype) for _ in range(2 if name == "lstm" else 1))
    return s if len(s) > 1 else s[0]


@pytest.fixture
def spy(monkeypatch):
    """Counts the direct layer entry's calls and how many it ran (not NotImplemented)."""
    return spy_layer_run(monkeypatch)


def outputs(result):
    out, h = result
    return [out, *flatten_states(h)]


# ------------------------------------------------------------------ the one-step fast path against torch.nn

@needs_fused
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 3, 6])  # the N < 4 and N >= 4 kernels
@pytest.mark.parametrize("batch_first,bias,zero_hx", [(False, True, False), (True, False, True),
                                                      (True, True, False), (False, False, True)],
                         ids=["hx", "bf-nobias-hxNone", "bf-hx", "nobias-hxNone"])
def test_one_step_matches_torch_nn(spy, name, dtype, n, batch_first, bias, zero_hx):
    ours, theirs = make(name, dtype=dtype, batch_first=batch_first, bias=bias)
    x = torch.randn((n, 1, 13) if batch_first else (1, n, 13), dtype=dtype)
    hx = None if zero_hx else state(name, n, dtype=dtype)
    with torch.no_grad():
        got, want = outputs(ours(x, hx)), outputs(theirs(x, hx))
    assert spy == {"calls": 1, "ran": 1}
    assert ours.last_backend == "fused"
    for u, v in zip(got, want):
        assert_close(u, v, dtype, f"{name} one step")
        assert not u.requires_grad
    assert got[0].data_ptr() != got[1].data_ptr()  # output and h_n are distinct tensors, as torch.nn's
    inputs = [x, *(flatten_states(hx) if hx is not None else [])]
    assert all(u.data_ptr() != t.data_ptr() for u in got for t in inputs)


@needs_fused
def test_stream_of_steps_equals_one_call(spy):
    """Feeding a sequence one step at a time (the fast path) gives the full call's outputs and state."""
    ours, _ = make("lstm")
    x = torch.randn(7, 2, 13)
    with torch.no_grad():
        want_out, want_state = ours(x)
        hx, outs = None, []
        for t in range(7):
            out, hx = ours(x[t:t + 1], hx)
            outs.append(out)
    assert spy["ran"] == 8  # the whole call and each step
    assert_close(torch.cat(outs), want_out, torch.float32, "stepped output")
    for u, v in zip(hx, want_state):
        assert_close(u, v, torch.float32, "stepped state")


# ------------------------------------------------------------------ plain inference over a sequence

@pytest.fixture
def full_path(monkeypatch):
    """Counts the calls that took the full path (which reads the input with read_input)."""
    from rnnkit import layers
    counts = {"calls": 0}
    real = layers.read_input

    def spy(*args, **kw):
        counts["calls"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(layers, "read_input", spy)
    return counts


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("backend", ["auto", "fused", "torch", "reference"])
@pytest.mark.parametrize("batch_first,zero_hx,dtype", [(False, False, torch.float32), (True, True, torch.float64)],
                         ids=["hx", "bf-hxNone-f64"])
def test_plain_inference_matches_torch_nn(full_path, name, backend, batch_first, zero_hx, dtype):
    if backend == "fused" and REASON is not None:
        pytest.skip(REASON)
    ours, theirs = make(name, dtype=dtype, batch_first=batch_first)
    ours.backend = backend
    x = torch.randn((3, 5, 13) if batch_first else (5, 3, 13), dtype=dtype)
    hx = None if zero_hx else state(name, 3, dtype=dtype)
    with torch.no_grad():
        got, want = outputs(ours(x, hx)), outputs(theirs(x, hx))
        assert full_path["calls"] == 0
        chosen = ours.which_backend(x)  # under no_grad, as the call: the direct inference entry's "fused"
    assert ours.last_backend == (chosen if backend == "auto" else backend)
    for u, v in zip(got, want):
        assert_close(u, v, dtype, f"{name} {backend}")
    assert got[0].data_ptr() != got[1].data_ptr()


@pytest.mark.parametrize("case", ["grad", "lengths", "two_layers", "unbatched", "h_shape", "state_dtype", "list_hx",
                                  "parameter_input"])
def test_plain_inference_declines(full_path, case):
    ours, theirs = make("gru", num_layers=2 if case == "two_layers" else 1)
    x, hx = torch.randn(4, 2, 13), None
    if case == "unbatched":
        x = torch.randn(4, 13)
    elif case == "h_shape":
        hx = torch.randn(1, 3, 11)
    elif case == "state_dtype":
        hx = torch.randn(1, 2, 11, dtype=torch.float64)
    elif case == "list_hx":
        ours, theirs = make("lstm")
        hx = list(state("lstm", 2))
    elif case == "parameter_input":
        x = torch.nn.Parameter(x, requires_grad=False)
    with torch.set_grad_enabled(case == "grad"):
        if case in ("h_shape", "state_dtype"):
            with pytest.raises((ValueError, TypeError), match="h_0 has"):
                ours(x, hx)
        else:
            kw = {"lengths": [4, 4]} if case == "lengths" else {}
            for u, v in zip(outputs(ours(x, hx, **kw)), outputs(theirs(x, hx))):
                assert_close(u.detach(), v.detach(), torch.float32, case)
    assert full_path["calls"] == 1


# ------------------------------------------------------------------ declined: the full path answers

@needs_fused
@pytest.mark.parametrize("case", ["grad", "two_layers", "bidirectional", "proj", "unbatched",
                                  "backend_torch", "backend_reference", "zoneout", "weight_drop_training",
                                  "parametrized", "list_hx", "packed", "lengths"])
def test_declined_calls_equal_torch_nn(spy, case):
    kw = {"two_layers": dict(num_layers=2), "bidirectional": dict(bidirectional=True),
          "proj": dict(proj_size=5)}.get(case, {})
    ours, theirs = make("lstm", **kw)
    x, hx = torch.randn(1, 3, 13), None
    if case == "unbatched":
        x = torch.randn(1, 13)
    elif case == "backend_torch":
        ours.backend = "torch"
    elif case == "backend_reference":
        ours.backend = "reference"
    elif case == "zoneout":
        ours.zoneout = 0.5  # changes the function in eval too: torch.nn has no zoneout, compare to reference
        ours.eval()
    elif case == "weight_drop_training":
        ours.weight_drop = 0.5
        ours.train()
    elif case == "parametrized":
        torch.nn.utils.parametrizations.weight_norm(ours, "weight_hh_l0")
        torch.nn.utils.parametrizations.weight_norm(theirs, "weight_hh_l0")
    elif case == "list_hx":
        hx = list(state("lstm", 3))
    grad = case == "grad"
    with torch.set_grad_enabled(grad):
        if case == "packed":
            x = torch.nn.utils.rnn.pack_sequence([torch.randn(1, 13), torch.randn(1, 13)])
        if case == "lengths":
            got = ours(x, lengths=[1, 1, 1])
            want = theirs(x)
        elif case == "zoneout":
            got = ours(x)
            ours.backend = "reference"
            want = ours(x)
        elif case == "weight_drop_training":
            torch.manual_seed(3)
            got = ours(x)
            torch.manual_seed(3)
            ours.backend = "reference"
            want = ours(x)
        else:
            got, want = ours(x, hx), theirs(x, hx)
    assert spy["ran"] == 0, case
    if case == "packed":
        got, want = (got[0].data, got[1]), (want[0].data, want[1])
    for u, v in zip(outputs(got), outputs(want)):
        assert_close(u.detach(), v.detach(), torch.float32, case)
    if grad:
        outputs(got)[0].sum().backward()
        assert ours.weight_ih_l0.grad is not None


@needs_fused
@pytest.mark.parametrize("case,exc,match", [
    ("feature", ValueError, r"input of shape \(1, 2, 4\) was read as \(L=1, N=2, H_in=4\)"),
    ("h_shape", ValueError, r"h_0 has shape \(1, 3, 11\) but expected \(1, 2, 11\)"),
    ("c_shape", ValueError, r"c_0 has shape \(1, 2, 10\) but expected \(1, 2, 11\)"),
    ("h_rank", ValueError, r"hx and cx should also be 3-D"),
    ("arity", TypeError, r"hx must be a tuple \(h_0, c_0\), got a tuple of 3"),
    ("dtype", TypeError, r"input has dtype torch.float64 but the parameters are torch.float32"),
    ("state_dtype", TypeError, r"h_0 has dtype torch.float64 but the parameters are torch.float32"),
    ("empty_batch", None, None),
])
def test_declined_calls_keep_their_errors(spy, case, exc, match):
    ours, theirs = make("lstm")
    x = torch.randn(1, 2, 13)
    h, c = torch.randn(1, 2, 11), torch.randn(1, 2, 11)
    hx = (h, c)
    if case == "feature":
        x = torch.randn(1, 2, 4)
    elif case == "h_shape":
        hx = (torch.randn(1, 3, 11), c)
    elif case == "c_shape":
        hx = (h, torch.randn(1, 2, 10))
    elif case == "h_rank":
        hx = (h[0], c[0])
    elif case == "arity":
        hx = (h, c, c)
    elif case == "dtype":
        x = x.double()
    elif case == "state_dtype":
        hx = (h.double(), c)
    elif case == "empty_batch":
        x, hx = torch.randn(1, 0, 13), (torch.randn(1, 0, 11), torch.randn(1, 0, 11))
    with torch.no_grad():
        if exc is None:  # no error: the full path's (empty) result, as torch.nn's
            for u, v in zip(outputs(ours(x, hx)), outputs(theirs(x, hx))):
                assert u.shape == v.shape
        else:
            with pytest.raises(exc, match=match):
                ours(x, hx)
    assert spy["ran"] == 0


# ------------------------------------------------------------------ rnnkit bench: the inference section

def test_inference_section_quick(capsys):
    """A tiny run: each row times every contestant (after checking it computes torch.nn's result),
    or says why not; the table prints every row."""
    code = cli.main(["bench", "--quick", "--quiet", "--section", "inference", "--cell", "lstm", "--threads", "1"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "[inference] forward under torch.no_grad()" in out
    lines = out.splitlines()
    assert any(line.split()[:2] == ["sequence", "lstm"] for line in lines)
    assert any(line.split()[:2] == ["step", "lstm"] for line in lines)
    assert not any(line.split()[1:2] == ["gru"] for line in lines)  # --cell lstm: no GRU row


def test_inference_rows_and_ratios():
    result = bench.run(cells=["gru"], sections=["inference"], quick=True, threads=1, progress=False)
    assert result["rows"] == []  # only the inference section ran
    rows = result["inference"]["rows"]
    assert [(r["kind"], r["cell"]) for r in rows] == [("sequence", "gru"), ("step", "gru")]
    try:
        import onnxruntime  # noqa: F401
        have_ort = True
    except ImportError:
        have_ort = False
    for r in rows:
        assert not any(why.startswith("failed") for why in r["skipped"].values()), r["skipped"]
        names = set(bench_inference.COLUMNS[r["kind"]])
        if not have_ort:
            names -= {bench_inference.ORT, bench_inference.ORT_RNNKIT}
        assert set(r["median_s"]) == names
        assert all(t > 0 for t in r["median_s"].values())
        q = bench_inference.ratios(r)
        ours = "rnnkit auto" if r["kind"] == "sequence" else "rnnkit layer"
        assert q[f"{ours}/torch.nn"] == pytest.approx(r["median_s"][ours] / r["median_s"]["torch.nn"])


def test_without_onnxruntime_the_column_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    row = bench_inference.run_row("step", "lstm", 1, 8, 1, threads=1, repeats=1, target_s=0.0)
    for name in (bench_inference.ORT, bench_inference.ORT_RNNKIT):
        assert row["skipped"][name].startswith("onnxruntime is not installed")
        assert name not in row["median_s"]
    assert "rnnkit layer" in row["median_s"]
    text = bench_inference.format_table({"settings": {"threads": 1, "repeats": 1, "ort_spinning": False},
                                         "rows": [row]})
    assert "not timed: onnxruntime: onnxruntime is not installed" in text


def test_a_wrong_result_is_not_timed(monkeypatch):
    """The check before timing can fail: a contestant whose result differs is reported, not timed (ORT on
    rnnkit's export included: it exports the layer class the row runs, here one whose output is off by 1)."""
    real = bench_inference._flat
    monkeypatch.setattr(bench_inference, "_classes", lambda cell: (
        lambda *a, **k: _Off(rnnkit.LSTM(*a, **k)), rnnkit.LSTMCell, torch.nn.LSTM))
    row = bench_inference.run_row("sequence", "lstm", 1, 8, 3, threads=1, repeats=1, target_s=0.0)
    for name in ("rnnkit auto", bench_inference.ORT_RNNKIT):
        assert row["skipped"][name].startswith("failed: AssertionError"), row["skipped"]
        assert name not in row["median_s"]
    assert "torch.nn" in row["median_s"] and bench_inference.ORT in row["median_s"]
    assert "ort rnnkit/ort" not in bench_inference.ratios(row)
    assert bench_inference._flat is real


@pytest.mark.parametrize("kind", ["sequence", "step"])
def test_onnxruntime_on_rnnkits_export(kind):
    """The contestant "ORT on rnnkit's export": an rnnkit GRU on torch.nn's weights, exported and run in ONNX
    Runtime, equals torch.nn (checked inside the row, before timing: it would be in ``skipped`` otherwise), is
    timed next to ORT on torch.nn's export, and the ratio of the two is a column of the table."""
    pytest.importorskip("onnxruntime")
    sessions = {}
    row = bench_inference.run_row(kind, "gru", 2, 8, 3, threads=1, repeats=1, target_s=0.0, sessions=sessions)
    assert row["skipped"] == {}
    t = row["median_s"]
    assert t[bench_inference.ORT_RNNKIT] > 0 and t[bench_inference.ORT] > 0
    assert bench_inference.ratios(row)["ort rnnkit/ort"] == pytest.approx(t[bench_inference.ORT_RNNKIT]
                                                                          / t[bench_inference.ORT])
    # one session per exported model, kept for the next row of the same (cell, hidden)
    assert sorted(k[0] for k in sessions) == sorted([bench_inference.ORT, bench_inference.ORT_RNNKIT])
    text = bench_inference.format_table({"settings": {"threads": 1, "repeats": 1, "ort_spinning": False},
                                         "rows": [row]})
    head, line = text.splitlines()[1:3]
    assert head.split()[-1] == "rnnkit/ort" and "ort rnnkit" in head
    assert float(line.split()[-1]) == pytest.approx(bench_inference.ratios(row)["ort rnnkit/ort"], abs=0.006)


class _Off(torch.nn.Module):
    """A layer whose output is off by 1."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def load_state_dict(self, sd, strict=True):
        return self.layer.load_state_dict(sd, strict)

    def forward(self, x, hx):
        out, h = self.layer(x, hx)
        return out + 1, h


def test_cpu_time_clock():
    result = bench_inference.run(cells=["lstm"], quick=True, threads=1, cpu_time=True)
    assert result["settings"]["clock"] == "thread CPU time"
    assert "(thread CPU time)" in bench_inference.format_table(result)
    assert all(t > 0 for r in result["rows"] for t in r["median_s"].values())
    with pytest.raises(ValueError, match="cpu_time counts the calling thread only, so it needs threads=1, got threads=2"):
        bench_inference.run(cells=["lstm"], quick=True, threads=2, cpu_time=True)
    with pytest.raises(SystemExit):
        bench_inference.main(["--quick", "--cpu-time", "--threads", "2"])


def test_inference_section_keeps_the_budget():
    result = bench.run(cells=["lstm"], sections=["layer", "inference"], sizes=["S"], quick=True, threads=1,
                       progress=False, budget_s=0.0)
    assert result["inference"] == {"skipped": "the time budget was spent (--budget 0 s)"}
    assert "[inference] not run: the time budget was spent (--budget 0 s)" in bench.format_table(result)


def test_inference_errors():
    with pytest.raises(ValueError, match=r"inference benchmark: cell must be one of \['lstm', 'gru'\], got 'rnn'"):
        bench_inference.run(cells=["rnn"], quick=True)
    result = bench.run(cells=["rnn"], sections=["inference"], quick=True, threads=1, progress=False)
    assert "not" in result["inference"]["skipped"] and "'rnn'" in result["inference"]["skipped"]
    assert "[inference] not run: the inference section times ['lstm', 'gru']" in bench.format_table(result)


def test_bench_help_names_both_exports(capsys):
    """`rnnkit bench --help` says the inference section runs ONNX Runtime on torch.nn's export and on rnnkit's."""
    assert cli.main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "ONNX Runtime on two exports of the same layer: torch.nn's (\"onnxruntime\") and rnnkit's own" in text
    assert f'"{bench_inference.ORT_RNNKIT}"' in text and '"ort rnnkit/ort"' in text


def test_readme_inference_tables_have_the_printed_columns():
    """The README's inference tables carry the columns `rnnkit bench --section inference` prints (format_table's
    header, the `ort rnnkit` columns included), in its order."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    result = {"settings": {"threads": 1, "repeats": 1, "ort_spinning": False},
              "rows": [{"kind": kind, "cell": "lstm", "batch": 1, "hidden": 64, "seq_len": 1, "median_s": {},
                        "skipped": {}} for kind in ("sequence", "step")]}
    printed = bench_inference.format_table(result).splitlines()
    import re
    for kind, line in (("sequence", printed[1]), ("step", printed[3])):
        columns = re.split(r"\s{2,}", line.strip())  # format_table pads with two spaces at least
        assert columns[5:5 + len(bench_inference.COLUMNS[kind])] == list(bench_inference.COLUMNS[kind])
        assert bench_inference.ORT_RNNKIT in columns and columns[-1] == "ort rnnkit/ort"
        assert "| " + " | ".join(columns) + " |" in readme, kind
