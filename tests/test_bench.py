"""`rnnkit bench` on a tiny (--quick) setting: table rows, the JSON, registry walking.
No speed is asserted; the figures are checked for consistency only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit import bench, cli
from rnnkit.backends import BACKENDS, ReferenceBackend, why_not

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expected_layer_contestants(name):
    """The oracle for who should run in a layer row: every backend that is available and
    accepts the module, plus torch.nn when the layer has an equivalent."""
    entry = rnnkit.LAYERS[name]
    names = set()
    for b in BACKENDS:
        if BACKENDS[b].unavailable() is None:
            try:
                module = entry.make(4, 8, backend=b)
            except ValueError:
                continue
            if why_not(b, module, torch.randn(entry.input_shape(3, 1, 4))) is None:
                names.add(b)
    if entry.torch_equivalent is not None:
        names.add(bench.TORCH_NN)
    return names


def test_quick_run_table_and_json(capsys, tmp_path):
    path = tmp_path / "out" / "bench.json"
    code, out, _ = run_cli(capsys, "bench", "--quick", "--quiet", "--cell", "lstm", "--cell", "gru", "--size", "S",
                           "--size", "M", "--json", str(path))
    assert code == 0
    lines = out.splitlines()
    for section in bench.SECTIONS:
        assert f"[{section}] {bench.SECTION_TITLES[section]}" in lines
    header = next(line for line in lines if line.startswith("cell "))
    for name in list(expected_layer_contestants("lstm")) + ["best", "torch.nn/best"]:
        assert name in header.split()
    table, section = {}, None
    for line in lines:
        if line.startswith("["):
            section = line[1:line.index("]")]
        elif line.split()[:1] in (["lstm"], ["gru"]):
            cells = line.split()
            table[(section, cells[0], cells[1])] = cells
    assert len(table) == 3 * 2 * 2  # sections x cells x sizes
    assert f"json: {path}" in lines

    result = json.loads(path.read_text())
    assert result["settings"]["quick"] is True and result["settings"]["threads"] == 2
    assert result["machine"]["torch"] == torch.__version__
    assert result["machine"]["backends"] == rnnkit.describe_backends()
    assert {(r["section"], r["cell"], r["size"]) for r in result["rows"]} == {
        (s, c, z) for s in bench.SECTIONS for c in ("lstm", "gru") for z in ("S", "M")}
    for r in result["rows"]:
        ran = set(r["times_s"])
        if r["section"] != "step":
            assert ran == expected_layer_contestants(r["cell"]), r
        assert ran | set(r["skipped"]) >= set(BACKENDS) | {bench.TORCH_NN}
        ours = {n: t for n, t in r["times_s"].items() if n != bench.TORCH_NN}
        assert r["best"] == min(ours, key=ours.get)
        for n, t in r["times_s"].items():
            assert t > 0 and r["median_s"][n] >= t
            assert r["ratio_to_best"][n] == pytest.approx(t / ours[r["best"]])
        for n, t in ours.items():
            assert r["torch_nn_speedup"][n] == pytest.approx(r["times_s"][bench.TORCH_NN] / t)
        table_row = table[(r["section"], r["cell"], r["size"])]
        assert table_row[2] == str(r["config"]["batch"]) and table_row[-2] == r["best"]
        assert table_row[-1] == f"{r['torch_nn_speedup'][r['best']]:.2f}"
    step = next(r for r in result["rows"] if r["section"] == "step" and r["cell"] == "lstm")
    assert step["config"]["batch"] == 1 and step["config"]["seq_len"] == 1
    lengths = next(r for r in result["rows"] if r["section"] == "lengths" and r["size"] == "M")
    assert max(lengths["config"]["lengths"]) == lengths["config"]["seq_len"]


def test_threads_are_set_and_restored(monkeypatch):
    seen = []
    real = bench.time_row
    monkeypatch.setattr(bench, "time_row", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    bench.run(cells=["rnn"], sizes=["S"], sections=["layer"], quick=True, threads=1, progress=False)
    assert seen == [1] and torch.get_num_threads() == before


class _Fake(ReferenceBackend):
    name = "fake_backend"


class _Down(ReferenceBackend):
    name = "down_backend"

    def unavailable(self):
        return "no compiler found"


def test_new_backends_show_up_without_changes(capsys, monkeypatch):
    monkeypatch.setitem(BACKENDS, "fake_backend", _Fake())
    monkeypatch.setitem(BACKENDS, "down_backend", _Down())
    monkeypatch.setattr(rnnkit.backends, "BACKEND_CHOICES", rnnkit.backends.BACKEND_CHOICES + ("fake_backend",))
    result = bench.run(cells=["gru"], sizes=["S"], sections=["layer"], quick=True, progress=False)
    row = result["rows"][0]
    assert "fake_backend" in row["times_s"]
    assert row["skipped"]["down_backend"] == "unavailable: no compiler found"
    table = bench.format_table(result)
    assert "fake_backend" in table and "down_backend: unavailable: no compiler found" in table


def test_new_layers_show_up_without_changes(monkeypatch):
    class Plain(rnnkit.RNN):  # a non-torch.nn variant: the torch backend must decline it
        _is_standard = False

    monkeypatch.setitem(rnnkit.LAYERS, "plainrnn", rnnkit.LayerEntry("plainrnn", Plain, kwargs={"nonlinearity": "softsign"}))
    result = bench.run(cells=["plainrnn"], sizes=["S"], sections=["layer"], quick=True, progress=False)
    row = result["rows"][0]
    assert "reference" in row["times_s"] and "torch" not in row["times_s"]
    assert "no fused op" in row["skipped"]["torch"] and row["skipped"][bench.TORCH_NN] == "no torch.nn equivalent"
    assert row["torch_nn_speedup"] == {}


def test_too_slow_contestants_are_skipped_and_said(monkeypatch):
    result = bench.run(cells=["lstm"], sizes=["S"], sections=["layer"], quick=True, max_call_s=1e-9,
                       progress=False)
    row = result["rows"][0]
    assert row["times_s"] == {} and row["best"] is None
    assert all(r.startswith("too slow") for r in row["skipped"].values() if not r.startswith("unavailable"))
    assert "too slow" in bench.format_table(result)


@pytest.mark.parametrize("full_call, kept", [(0.5, True), (1.5, False)])
def test_a_pessimistic_probe_is_checked_with_one_full_call(monkeypatch, full_call, kept):
    class Plain(rnnkit.RNN):  # softsign: runs on the reference backend only, one contestant
        _is_standard = False

    monkeypatch.setitem(rnnkit.LAYERS, "plainrnn", rnnkit.LayerEntry("plainrnn", Plain, kwargs={"nonlinearity": "softsign"}))
    answers = iter([1.0, 1.0, 1.0])  # 3 probe calls of 5 steps: about 2 s for T=10, not over twice the 1 s limit

    def fake_time_calls(fn, number):
        fn()
        return next(answers, full_call)

    monkeypatch.setattr(bench, "_time_calls", fake_time_calls)
    monkeypatch.setattr(bench, "thread_check", lambda threads: {"slowdown_vs_1_thread": 0.5})
    result = bench.run(cells=["plainrnn"], sizes=["S"], sections=["layer"], quick=True, max_call_s=1.0,
                       progress=False)
    row = result["rows"][0]
    if kept:
        assert row["times_s"] == {"reference": full_call}
    else:
        assert row["times_s"] == {}
        assert row["skipped"]["reference"] == "too slow: 1.5 s per call (limit 1 s, --max-call)"


def test_the_time_budget_stops_new_rows_and_says_so():
    result = bench.run(cells=["rnn"], sizes=["S", "M"], sections=["layer"], quick=True, budget_s=0.0,
                       progress=False)
    assert [r["times_s"] for r in result["rows"]] == [{}, {}]
    reason = "not run: the time budget was spent (--budget 0 s)"
    assert all(set(r["skipped"].values()) >= {reason} for r in result["rows"])
    assert reason in bench.format_table(result)


def test_spatial_layers_run_only_with_all_or_by_name(monkeypatch):
    monkeypatch.setitem(rnnkit.LAYERS, "fake_conv", rnnkit.LayerEntry("fake_conv", rnnkit.LSTM, spatial=(2,)))
    kw = dict(sizes=["S"], sections=["layer"], quick=True, progress=False)
    assert "fake_conv" not in {r["cell"] for r in bench.run(**kw)["rows"]}
    rows = bench.run(all_layers=True, **kw)["rows"]
    assert {r["cell"] for r in rows} == set(rnnkit.LAYERS)
    fake = next(r for r in rows if r["cell"] == "fake_conv")  # LSTM cannot read (L, N, C, W): reported, not fatal
    assert fake["times_s"] == {} and fake["skipped"]["reference"].startswith("failed: RNNShapeError")
    assert [r["cell"] for r in bench.run(cells=["fake_conv"], **kw)["rows"]] == ["fake_conv"]


def test_a_row_where_only_torch_nn_ran_is_printed(monkeypatch):
    def decline(self, module, x):
        return "declined for this test"

    for name in BACKENDS:
        monkeypatch.setattr(type(BACKENDS[name]), "unsupported", decline)
    result = bench.run(cells=["rnn"], sizes=["S"], sections=["layer"], quick=True, progress=False)
    row = result["rows"][0]
    assert set(row["times_s"]) == {bench.TORCH_NN} and row["best"] is None and row["ratio_to_best"] == {}
    line = next(x for x in bench.format_table(result).splitlines() if x.startswith("rnn "))
    assert line.split()[-2:] == ["-", "-"] and "n/a" in line


def test_thread_check_and_its_warning():
    check = bench.thread_check(2)
    assert check["slowdown_vs_1_thread"] == pytest.approx(check["matmul_s_2_threads"] / check["matmul_s_1_threads"])
    result = bench.run(cells=["rnn"], sizes=["S"], sections=["layer"], quick=True, progress=False)
    assert set(result["machine"]["thread_check"]) == set(check) | {"at_start_and_end"}
    assert result["machine"]["thread_check"]["slowdown_vs_1_thread"] == max(
        result["machine"]["thread_check"]["at_start_and_end"])
    for slowdown, warned in [(12.0, True), (0.6, False)]:
        result["machine"]["thread_check"]["slowdown_vs_1_thread"] = slowdown
        table = bench.format_table(result)
        assert ("warning: 2 threads were starved" in table) is warned
        if warned:
            assert "took 12.0x longer on 2 threads than on 1" in table


def test_time_row_interleaves_and_takes_the_minimum():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    mins, medians = bench.time_row(fns, repeats=3, target_s=0.0)
    timed = calls[6:]  # after a warm-up and a calibration call each
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert set(mins) == {"a", "b", "c"} and all(medians[n] >= mins[n] > 0 for n in mins)


@pytest.mark.parametrize("argv, message", [
    (["--cell", "nope"], "unknown cell 'nope'"),
    (["--size", "XL"], "argument --size: invalid choice: 'XL'"),
    (["--section", "x"], "argument --section: invalid choice: 'x'"),
    (["--repeats", "0"], "repeats, seq_len and threads must be >= 1"),
    (["--max-call", "0"], "--max-call must be positive"),
    (["--budget", "-1"], "--budget must be >= 0"),
])
def test_bench_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, "bench", "--quick", "--quiet", *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


def test_benchmarks_script_is_the_same_command(tmp_path):
    path = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--quick", "--quiet",
                           "--cell", "rnn", "--size", "S", "--section", "step", "--json", str(path)],
                          capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "[step]" in proc.stdout
    rows = json.loads(path.read_text())["rows"]
    assert [(r["section"], r["cell"], r["size"]) for r in rows] == [("step", "rnn", "S")]
    assert bench.TORCH_NN in rows[0]["times_s"]


# ----------------------------------------------------------------------------- checks, rounds and run order


class _Wrong(ReferenceBackend):
    """Computes a different function (output scaled by 1.5): the check must catch it."""
    name = "wrong_backend"

    def run(self, module, x, state0, lengths):
        out, state = super().run(module, x, state0, lengths)
        return out * 1.5, state


def _with_backend(monkeypatch, backend):
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    monkeypatch.setattr(rnnkit.backends, "BACKEND_CHOICES", rnnkit.backends.BACKEND_CHOICES + (backend.name,))


@pytest.mark.parametrize("cell, oracle", [("lstm", bench.TORCH_NN), ("indrnn", "reference")])
def test_a_contestant_that_computes_something_else_is_not_timed(monkeypatch, cell, oracle):
    _with_backend(monkeypatch, _Wrong())
    result = bench.run(cells=[cell], sizes=["S"], sections=["layer"], quick=True, progress=False)
    row = result["rows"][0]
    assert row["checked_against"] == oracle and oracle in row["times_s"]
    assert "wrong_backend" not in row["times_s"]
    reason = row["skipped"]["wrong_backend"]
    assert reason.startswith("wrong result at T=5: output 0 differs from " + oracle), reason  # caught on the probe
    line = next(x for x in bench.format_table(result).splitlines() if x.startswith(cell + " "))
    assert "wrong" in line.split()
    assert f"layer {cell} S wrong_backend: {reason}" in bench.format_table(result)


def test_the_full_length_call_is_checked_too(monkeypatch):
    class LateWrong(ReferenceBackend):  # right for 5 steps, wrong beyond: only the full call shows it
        name = "late_wrong"

        def run(self, module, x, state0, lengths):
            out, state = super().run(module, x, state0, lengths)
            if x.shape[0] > 5:
                out = out.clone()
                out[5:] += 1.0
            return out, state

    _with_backend(monkeypatch, LateWrong())
    row = bench.run(cells=["gru"], sizes=["S"], sections=["layer"], quick=True, progress=False)["rows"][0]
    assert row["skipped"]["late_wrong"].startswith("wrong result at T=10: output 0 differs from torch.nn's by 1")


def test_gradients_are_checked(monkeypatch):
    class WrongGrad(ReferenceBackend):  # the right output with a wrong gradient
        name = "wrong_grad"

        def run(self, module, x, state0, lengths):
            out, state = super().run(module, x, state0, lengths)
            return out + (out - out.detach()) * 2.0, state

    _with_backend(monkeypatch, WrongGrad())
    row = bench.run(cells=["rnn"], sizes=["S"], sections=["lengths"], quick=True, progress=False)["rows"][0]
    assert row["skipped"]["wrong_grad"].startswith("wrong result at T=5: grad weight_ih_l0 differs from torch.nn's")


def test_contestants_share_the_oracles_weights():
    for section, cell, oracle in [("layer", "lstm", bench.TORCH_NN), ("step", "gru", bench.TORCH_NN),
                                  ("layer", "peephole_lstm", "reference")]:
        builders, _, _ = bench._contestants(section, rnnkit.LAYERS[cell], bench.QUICK_SIZES["M"], 4, 0)
        assert bench._oracle(builders) == oracle
        want = None
        for name, build in builders.items():
            fn = build(4)
            got = bench._result(fn, fn())
            if want is None:
                want = got
            else:
                assert bench._mismatch(got, want, "first", 4) is None, (section, cell, name)


def test_mismatch_tolerance_grows_with_the_steps_and_catches_nan():
    want = {"output 0": torch.tensor([10.0, -2.0])}

    def got(first):
        return {"output 0": torch.tensor([first, -2.0])}
    assert bench._mismatch(got(10.0 + 9e-4), want, "o", 1) is None  # 9e-5 of the largest value: within 1e-4 x T=1
    assert bench._mismatch(got(10.0 + 2e-3), want, "o", 1) == (
        "wrong result at T=1: output 0 differs from o's by 0.0002 (relative to its largest value; tolerance 0.0001)")
    assert bench._mismatch(got(10.0 + 9e-2), want, "o", 100) is None  # 9e-3: within 1e-4 x T=100
    assert "differs" in bench._mismatch(got(10.0 + 2e-1), want, "o", 100)
    assert bench._mismatch({"output 0": torch.tensor([0.1 + 5e-5])}, {"output 0": torch.tensor([0.1])}, "o", 1) is None
    assert "differs" in bench._mismatch(got(float("nan")), want, "o", 100)
    assert "has shape (1,)" in bench._mismatch({"output 0": torch.tensor([10.0])}, want, "o", 1)
    assert "computes" in bench._mismatch({}, want, "o", 1)


def test_a_row_without_an_oracle_is_timed_and_said_unchecked(monkeypatch):
    def decline(self, module, x):
        return "declined for this test"

    class Accepting(ReferenceBackend):
        name = "accepting"

        def unsupported(self, module, x):
            return None

    monkeypatch.setattr(ReferenceBackend, "unsupported", decline)  # no reference, and indrnn has no torch.nn
    _with_backend(monkeypatch, Accepting())
    result = bench.run(cells=["indrnn"], sizes=["S"], sections=["layer"], quick=True, progress=False)
    row = result["rows"][0]
    assert row["checked_against"] is None and "accepting" in row["times_s"]
    assert "unchecked (no oracle ran): layer indrnn S" in bench.format_table(result)
    checked = bench.run(cells=["lstm"], sizes=["S"], sections=["layer"], quick=True, progress=False)
    assert "unchecked" not in bench.format_table(checked)


def test_rounds_fit_the_row_unless_repeats_are_given():
    assert bench.rounds_for({"a": 1e-3, "b": 2e-3}, 0.02, None) == bench.MAX_REPEATS  # small calls: 5
    assert bench.rounds_for({"a": 0.4, "b": 0.5}, 0.02, None) == bench.MIN_REPEATS  # a round of 0.9 s: 3, not 1
    assert bench.rounds_for({"a": 0.2}, 0.02, None, row_s=1.0) == 5 and bench.rounds_for({"a": 0.25}, 0.02, None) == 4
    assert bench.rounds_for({"a": 5.0}, 0.02, 7) == 7


def test_repeats_option_fixes_the_rounds(capsys, tmp_path):
    path = tmp_path / "b.json"
    code, out, _ = run_cli(capsys, "bench", "--quick", "--quiet", "--cell", "rnn", "--size", "S", "--section", "step",
                           "--repeats", "1", "--json", str(path))
    assert code == 0 and "min of 1 interleaved repeats" in out
    result = json.loads(path.read_text())
    assert [r["repeats"] for r in result["rows"]] == [1] and result["settings"]["rounds"] == {"min": 1, "max": 1}
    default = bench.run(cells=["rnn"], sizes=["S"], sections=["step"], progress=False, seq_len=3, budget_s=None)
    assert default["settings"]["repeats"] is None
    assert bench.MIN_REPEATS <= default["rows"][0]["repeats"] <= bench.MAX_REPEATS
    assert "min of 3-5 interleaved repeats" in bench.format_table(default)
    total = bench.format_table(default).splitlines()[-1]
    assert total.startswith("total ") and "(CPU time " in total


def test_every_section_runs_before_the_largest_size(monkeypatch):
    from rnnkit import bench_inference
    seen = []
    monkeypatch.setattr(bench, "_run_row", lambda section, entry, size, *a, **k: seen.append((section, size)) or
                        bench._unrun_row(section, entry, size, bench.QUICK_SIZES[size], 3, 0, "fake"))
    monkeypatch.setattr(bench_inference, "run", lambda **k: seen.append(("inference",)) or {"skipped": "fake"})
    result = bench.run(cells=["lstm"], quick=True, progress=False)
    first_l = seen.index(("layer", "L"))
    assert seen[first_l - 1] == ("inference",) and {s for s, *_ in seen[:first_l]} == set(bench.SECTIONS) | {"inference"}
    assert [(r["section"], r["size"]) for r in result["rows"]] == [(s, z) for s in bench.SECTIONS for z in "SML"]


def test_inference_check_compares_like_assert_close():
    from rnnkit.bench_inference import _assert_close
    want = torch.tensor([1.0, -2.0, 0.0])
    _assert_close(want + torch.tensor([1e-4, -2e-4, 1e-4]), want)  # within 1e-4 + 1e-4 * |want|
    for got, message in [(want + torch.tensor([0.0, 0.0, 2e-4]), "1 of 3 elements differ, the most by 0.0002"),
                         (torch.tensor([1.0, float("nan"), 0.0]), "1 of 3 elements differ, the most by inf"),
                         (want.double(), "dtype torch.float64 != torch.float32")]:
        with pytest.raises(AssertionError, match=message):
            _assert_close(got, want)
