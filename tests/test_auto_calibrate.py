"""backend='auto' measures fused vs torch where it runs (rnnkit/fused/calibrate.py).

The timing function (``calibrate.race``) is replaced by a fake that returns chosen
numbers, so the tests dictate which backend "measured" faster and check that auto
follows the measurement (not the shipped table), remembers it in memory and in the
cache file, keys that file per machine, survives an unwritable or corrupt cache, stays
off when asked (RNNKIT_AUTO_MEASURE=0) and under torch.compile, and never changes
results or the RNG state. The real timing runs only on the tiny `rnnkit calibrate --quick`.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit import cli
from rnnkit.backends import BACKENDS
from rnnkit.fused import backend as fb
from rnnkit.fused import calibrate as cal

FUSED = BACKENDS["fused"]
REASON = FUSED.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused backend unavailable: {REASON}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the shipped-table stand-in: lstm S -> fused, gru S -> torch
TABLE = {"machine": {"cpu": "the developers' CPU", "threads": 2},
         "fastest": {"lstm": {"S": "fused", "M": "fused"}, "gru": {"S": "torch"}}}
FUSED_FASTER = {"fused": 1e-3, "torch": 2e-3}
TORCH_FASTER = {"fused": 2e-3, "torch": 1e-3}


class FakeRace:
    """Stands in for calibrate.race: returns the next queued numbers and records each call."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []

    def __call__(self, fns, repeats, once):
        assert set(fns) == {"fused", "torch"} and repeats >= 1 and set(once) == set(fns)
        self.calls.append({"grad": torch.is_grad_enabled(), "repeats": repeats})
        if not self.answers:
            raise AssertionError("measured more often than expected")
        return self.answers.pop(0)


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measuring on, a private cache folder, a fresh calibrator and a known shipped table."""
    monkeypatch.setenv(cal.MEASURE_ENV, "1")
    monkeypatch.setenv(cal.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(FUSED, "_calibrator", None)
    monkeypatch.setattr(FUSED, "_table", TABLE)
    # tiny synthetic problems: the fake timer decides, the real warm-up calls only need to run
    monkeypatch.setattr(cal, "problem", lambda klass: (min(cal.parse_bucket(klass.size)[0], 3), 4, 8, 3))
    monkeypatch.setattr(cal, "MAX_WARMUP_S", 60.0)  # however busy the machine, these are measured
    return tmp_path / "cache"


def fake(monkeypatch, *answers) -> FakeRace:
    race = FakeRace(*answers)
    monkeypatch.setattr(cal, "race", race)
    return race


def small_lstm_and_gru():
    torch.manual_seed(0)
    return rnnkit.LSTM(32, 64), rnnkit.GRU(32, 64), torch.randn(5, 1, 32)  # size bucket N1H64 (the table's S)


# ----------------------------------------------------------------------------- auto follows the measurement


def test_auto_follows_the_measurement_not_the_table_both_ways(measuring, monkeypatch):
    lstm, gru, x = small_lstm_and_gru()
    assert FUSED.table_choice(lstm, x) == "fused" and FUSED.table_choice(gru, x) == "torch"
    race = fake(monkeypatch, TORCH_FASTER, FUSED_FASTER)
    lstm(x)
    assert lstm.last_backend == "torch"  # the table said fused
    gru(x)
    assert gru.last_backend == "fused"  # the table said torch
    assert len(race.calls) == 2 and all(c["grad"] for c in race.calls)  # forward+backward, grad enabled
    # remembered: no second measurement, which_backend agrees
    lstm(x), gru(x)
    assert lstm.which_backend(x) == "torch" and gru.which_backend(x) == "fused"
    assert len(race.calls) == 2
    best, why = FUSED.explain_choice(lstm, x)
    assert best == "torch" and why.startswith("measured on this machine (lstm|float32|dense|fwd+bwd|N1H64")
    assert str(cal.cache_path()) in why


def test_each_class_is_measured_once(measuring, monkeypatch):
    """dtype, lengths, grad mode and size bucket are parts of the class; the batch within a bucket is not."""
    race = fake(monkeypatch, TORCH_FASTER, FUSED_FASTER, TORCH_FASTER, FUSED_FASTER, TORCH_FASTER, TORCH_FASTER)
    torch.manual_seed(0)
    # two layers: a plain no-grad call of a one-layer LSTM this small takes the inference kernel by rule
    # (layers.AUTO_DIRECT_LSTM_MACS, tested in test_inference.py), not the measured choice
    lstm = rnnkit.LSTM(32, 64, num_layers=2)
    lstm(torch.randn(5, 3, 32))  # lstm float32 dense fwd+bwd N4H64: torch
    lstm(torch.randn(5, 5, 32))  # same class (batch 3 to 5 round to 4)
    assert len(race.calls) == 1 and lstm.last_backend == "torch"
    with torch.no_grad():  # forward only: its own class, measured without grad
        lstm(torch.randn(5, 4, 32))
    assert len(race.calls) == 2 and not race.calls[1]["grad"] and lstm.last_backend == "fused"
    with torch.inference_mode():  # the same forward-only class
        lstm(torch.randn(5, 4, 32))
    assert len(race.calls) == 2 and lstm.last_backend == "fused"
    lstm(torch.randn(5, 4, 32), lengths=torch.tensor([3, 2, 5, 1]))  # lengths: another class
    assert len(race.calls) == 3 and lstm.last_backend == "torch"
    rnnkit.LSTM(32, 64, dtype=torch.float64)(torch.randn(5, 4, 32, dtype=torch.float64))  # float64
    assert len(race.calls) == 4
    rnnkit.LSTM(64, 128)(torch.randn(5, 16, 64))  # another bucket
    assert len(race.calls) == 5
    lstm(torch.randn(5, 8, 32))  # batch 8: another bucket of the same module
    assert len(race.calls) == 6
    assert {str(k) for k in FUSED.calibrator().entries()} == {
        "lstm|float32|dense|fwd+bwd|N4H64", "lstm|float32|dense|fwd|N4H64", "lstm|float32|lengths|fwd+bwd|N4H64",
        "lstm|float64|dense|fwd+bwd|N4H64", "lstm|float32|dense|fwd+bwd|N16H128",
        "lstm|float32|dense|fwd+bwd|N8H64"}


def test_no_measurement_where_torch_cannot_run(measuring, monkeypatch):
    race = fake(monkeypatch)  # any measurement fails the test
    x = torch.randn(5, 1, 3)
    rnnkit.PeepholeLSTM(3, 4)(x)  # zoo cell: torch has no op, nothing to choose
    rnnkit.RNN(3, 4, nonlinearity="gelu")(x)  # not a torch.nn function
    lstm = rnnkit.LSTM(3, 4, dtype=torch.float16)
    lstm(x.half())  # fused declines float16
    assert race.calls == [] and FUSED.calibrator().entries() == {}


def test_a_tie_goes_to_torch(measuring, monkeypatch):
    """Within 8% (either way, whatever the shipped table says) torch runs: the op torch.nn runs."""
    fake(monkeypatch, {"fused": 1.00e-3, "torch": 1.07e-3}, {"fused": 1.07e-3, "torch": 1.00e-3})
    lstm, gru, x = small_lstm_and_gru()
    assert lstm.which_backend(x) == "torch" and gru.which_backend(x) == "torch"
    assert {e["how"] for e in FUSED.calibrator().entries().values()} == {"tie"}


def test_just_outside_a_tie_the_faster_wins(measuring, monkeypatch):
    fake(monkeypatch, {"fused": 1.00e-3, "torch": 1.09e-3}, {"fused": 1.09e-3, "torch": 1.00e-3})
    lstm, gru, x = small_lstm_and_gru()
    assert lstm.which_backend(x) == "fused" and gru.which_backend(x) == "torch"
    assert {e["how"] for e in FUSED.calibrator().entries().values()} == {"faster"}


def test_a_class_too_slow_to_warm_up_is_left_to_the_table(measuring, monkeypatch):
    """On first use, a class whose warm-up calls alone exceed MAX_WARMUP_S is not timed further:
    the table decides for this process, nothing is written, and it is not tried again."""
    monkeypatch.setattr(cal, "MAX_WARMUP_S", 0.0)
    race = fake(monkeypatch)  # no rounds
    lstm, gru, x = small_lstm_and_gru()
    lstm(x), gru(x), lstm(x)
    assert lstm.last_backend == "fused" and gru.last_backend == "torch" and race.calls == []
    assert [e["how"] for e in FUSED.calibrator().entries().values()] == ["cut short", "cut short"]
    assert FUSED.calibrator().measured == 2 and not cal.cache_path().exists()
    assert "measuring lstm|float32|dense|fwd+bwd|N1H64 was cut short" in FUSED.explain_choice(lstm, x)[1]
    # rnnkit calibrate has no such limit
    monkeypatch.setattr(cal, "race", FakeRace(TORCH_FASTER))
    assert cal.measure(cal.ClassKey("lstm", "float32", False, True, "N1H64"))["best"] == "torch"


def test_a_failed_measurement_warns_once_and_uses_the_table(measuring, monkeypatch):
    def broken(fns, repeats, once):
        raise RuntimeError("no timer here")
    monkeypatch.setattr(cal, "race", broken)
    monkeypatch.setattr(FUSED, "_warned_measure", False)
    lstm, gru, x = small_lstm_and_gru()
    with pytest.warns(RuntimeWarning, match=r"could not measure fused vs torch for lstm\|float32\|dense\|fwd\+bwd\|N1H64 "
                                            r"\(RuntimeError: no timer here\); using the shipped table"):
        lstm(x)
    assert lstm.last_backend == "fused"
    gru(x)
    assert gru.last_backend == "torch"
    calls = []
    monkeypatch.setattr(cal, "race", lambda *a: calls.append(a))
    lstm(x), gru(x)  # not tried again in this process, and never written
    assert calls == [] and not cal.cache_path().exists()
    assert FUSED.explain_choice(lstm, x)[1] == ("shipped table (auto_table.json): measuring lstm|float32|dense|"
                                                "fwd+bwd|N1H64 failed (RuntimeError: no timer here), for this process")


# ----------------------------------------------------------------------------- the cache file


def test_the_cache_file_is_written_and_read_by_a_new_backend(measuring, monkeypatch):
    fake(monkeypatch, TORCH_FASTER)
    lstm, _, x = small_lstm_and_gru()
    lstm(x)
    path = cal.cache_path()
    assert path.parent == measuring and path.name.startswith("auto-") and path.suffix == ".json"
    data = json.loads(path.read_text())
    assert data["format"] == cal.FORMAT and data["key"] == cal.machine_key()
    assert set(data["key"]) == {"cpu", "cpu_flags", "machine", "threads", "torch", "extension", "python"}
    assert data["key"]["threads"] == torch.get_num_threads() and data["key"]["torch"] == torch.__version__
    entry = data["choices"]["lstm|float32|dense|fwd+bwd|N1H64"]
    assert entry["best"] == "torch" and entry["torch_over_fused"] == pytest.approx(0.5)

    fresh = fb.FusedBackend()  # a new process, in effect: reads the file, measures nothing
    fresh._table = TABLE
    race = fake(monkeypatch)
    assert fresh.choice(lstm, x) == "torch" and race.calls == []
    assert fresh.explain_choice(lstm, x)[1].startswith("measured on this machine")


def test_the_cache_is_keyed_per_machine(measuring, monkeypatch):
    fake(monkeypatch, TORCH_FASTER)
    lstm, _, x = small_lstm_and_gru()
    lstm(x)
    key = cal.machine_key()
    assert cal.cache_path({**key, "threads": key["threads"] + 1}) != cal.cache_path(key)
    assert cal.cache_path({**key, "cpu": "another CPU"}) != cal.cache_path(key)
    # another machine (CPU model and flags, torch, extension): its own file; ours is not read
    other = tuple((k, "another CPU" if k == "cpu" else v) for k, v in cal._static_key())
    monkeypatch.setattr(cal, "_static_key", lambda: other)
    monkeypatch.setenv(cal.MEASURE_ENV, "cached")  # read the cache, never measure
    fresh = fb.FusedBackend()
    fresh._table = TABLE
    assert fresh.explain_choice(lstm, x) == ("fused", "shipped table (auto_table.json)")
    # a file at our name that holds another key (copied from another machine) is ignored too
    ours = json.loads(cal.cache_path(key).read_text())
    cal.cache_path().write_text(json.dumps({**ours, "key": key}))
    fresh = fb.FusedBackend()
    fresh._table = TABLE
    assert fresh.choice(lstm, x) == "fused"


@pytest.mark.parametrize("junk", ["{not json", "[]", json.dumps({"format": 99, "choices": {}}), "\x00\xff"])
def test_a_corrupt_cache_is_ignored(measuring, monkeypatch, junk):
    path = cal.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(junk)
    race = fake(monkeypatch, TORCH_FASTER)
    lstm, _, x = small_lstm_and_gru()
    lstm(x)  # no exception; measured anew
    assert lstm.last_backend == "torch" and len(race.calls) == 1
    assert json.loads(path.read_text())["choices"]["lstm|float32|dense|fwd+bwd|N1H64"]["best"] == "torch"  # replaced


def test_bad_entries_of_a_cache_are_ignored(measuring, monkeypatch):
    key = cal.machine_key()
    path = cal.cache_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": cal.FORMAT, "key": key, "choices": {
        "lstm|float32|dense|fwd+bwd|N1H64": {"best": "banana"}, "nonsense": {"best": "torch"},
        "gru|float32|dense|fwd+bwd|N1H64": {"best": "fused"}}}))
    race = fake(monkeypatch, TORCH_FASTER)
    lstm, gru, x = small_lstm_and_gru()
    assert gru.which_backend(x) == "fused" and race.calls == []  # the good entry is used (table: torch)
    assert lstm.which_backend(x) == "torch" and len(race.calls) == 1  # the bad one is measured again


def test_an_unwritable_cache_only_turns_persistence_off(measuring, monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(cal.CACHE_ENV, str(blocker / "cache"))  # a folder under a file: cannot be made
    race = fake(monkeypatch, TORCH_FASTER, FUSED_FASTER)
    lstm, gru, x = small_lstm_and_gru()
    lstm(x)
    gru(x)
    assert lstm.last_backend == "torch" and gru.last_backend == "fused" and len(race.calls) == 2
    calibrator = FUSED.calibrator()
    assert calibrator.persist_error is not None and str(blocker) in calibrator.persist_error
    assert "in memory" in FUSED.explain_choice(lstm, x)[1]
    assert cli.main(["info"]) == 0
    assert "cache not writable" in capsys.readouterr().out


# ----------------------------------------------------------------------------- off, cached, compile, tools


def test_measure_off_uses_the_shipped_table(measuring, monkeypatch):
    fake(monkeypatch, TORCH_FASTER)
    lstm, gru, x = small_lstm_and_gru()
    lstm(x)  # measured: torch, and written to the cache
    assert lstm.last_backend == "torch"
    monkeypatch.setenv(cal.MEASURE_ENV, "0")
    race = fake(monkeypatch)
    for backend in (FUSED, fb.FusedBackend()):  # neither memory nor the file is consulted
        backend._table = TABLE
        assert backend.explain_choice(lstm, x) == ("fused", "shipped table (auto_table.json)")
        assert backend.choice(gru, x) == "torch"
    lstm(x)
    assert lstm.last_backend == "fused" and race.calls == []


def test_cached_mode_reads_the_cache_and_measures_nothing(measuring, monkeypatch):
    fake(monkeypatch, TORCH_FASTER)
    lstm, gru, x = small_lstm_and_gru()
    lstm(x)
    monkeypatch.setenv(cal.MEASURE_ENV, "cached")
    race = fake(monkeypatch)
    fresh = fb.FusedBackend()
    fresh._table = TABLE
    assert fresh.choice(lstm, x) == "torch"  # from the cache
    assert fresh.choice(gru, x) == "torch"  # unmeasured: the table's
    assert race.calls == []


def test_no_measurement_under_torch_compile_and_identical_results(measuring, monkeypatch):
    race = fake(monkeypatch)  # any measurement fails the test

    def run(measure: str):
        monkeypatch.setenv(cal.MEASURE_ENV, measure)
        torch._dynamo.reset()
        torch.manual_seed(0)
        gru = rnnkit.GRU(4, 8, num_layers=2)
        x = torch.randn(6, 3, 4, requires_grad=True)
        compiled = torch.compile(gru, backend="eager")
        with torch._dynamo.config.patch(allow_rnn=True):
            out, h = compiled(x)
        (out.sum() + h.sum()).backward()
        return out, h, x.grad, gru.weight_hh_l0.grad, torch.random.get_rng_state()

    try:
        measured, table = run("1"), run("0")
    finally:
        torch._dynamo.reset()
    assert race.calls == [] and FUSED.calibrator().entries() == {}
    for a, b in zip(measured, table):
        assert torch.equal(a, b)


def test_no_measurement_inside_torch_func_transforms(measuring, monkeypatch):
    race = fake(monkeypatch)  # any measurement fails the test
    lstm, gru, x = small_lstm_and_gru()
    params = dict(lstm.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(lstm, p, (x,))[0].sum())(params)
    assert set(grads) == set(params) and lstm.last_backend == "fused"  # the table's choice
    out = torch.func.vmap(lambda xi: lstm(xi)[0], in_dims=1, out_dims=1)(torch.randn(5, 2, 1, 32))
    assert out.shape == (5, 2, 1, 64)
    assert race.calls == [] and FUSED.calibrator().entries() == {}


def test_measuring_never_changes_results_or_the_rng(measuring, monkeypatch):
    """A measured forward gives bit for bit what the chosen backend gives, dropout masks included."""
    race = fake(monkeypatch, FUSED_FASTER)

    def run(backend):
        torch.manual_seed(1)
        lstm = rnnkit.LSTM(32, 64, num_layers=2, dropout=0.5, backend=backend)  # dropout draws from the RNG
        x = torch.randn(7, 1, 32, requires_grad=True)
        out, (h, c) = lstm(x)
        out.sum().backward()
        return out, h, c, x.grad, lstm.weight_ih_l1.grad, torch.randn(3)

    measured = run("auto")
    assert len(race.calls) == 1  # measured inside that forward
    for a, b in zip(measured, run("fused")):
        assert torch.equal(a, b)


def test_a_calibration_leaves_the_rng_and_grad_mode_alone():
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        entry = cal.measure(cal.ClassKey("gru", "float32", True, True, "N1H64"), seq_len=3, repeats=1)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert entry["best"] in ("fused", "torch") and entry["fused_ms"] > 0 and entry["torch_ms"] > 0
    assert entry["repeats"] == cal.MIN_REPEATS and entry["seq_len"] == 3


def test_where_measuring_is_not_possible():
    assert cal.why_not_measure(torch.randn(2)) is None
    seen = []
    torch.vmap(lambda t: seen.append(cal.why_not_measure(t)) or t)(torch.randn(2, 3))
    torch.jit.trace(lambda t: seen.append(cal.why_not_measure(t)) or t * 2, torch.randn(2), check_trace=False)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False):
        seen.append(cal.why_not_measure(torch.randn(2)))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        seen.append(cal.why_not_measure(torch.randn(2)))
    assert seen == ["inside a torch.func transform", "torch.jit is tracing",
                    "a TorchFunctionMode or TorchDispatchMode is active", "saved-tensor hooks are active"]


def test_class_keys_read_the_table_as_auto_does():
    fastest = fb.load_table()["fastest"]
    for klass in cal.every_class(dtypes=("float32", "float64", "bfloat16")):
        torch.manual_seed(0)
        ctor = {"rnn_tanh": lambda: rnnkit.RNN(4, 8), "rnn_relu": lambda: rnnkit.RNN(4, 8, nonlinearity="relu"),
                "lstm": lambda: rnnkit.LSTM(4, 8), "lstm_proj": lambda: rnnkit.LSTM(4, 8, proj_size=2),
                "gru": lambda: rnnkit.GRU(4, 8)}[klass.family]
        module = ctor().to(cal.DTYPES[klass.dtype])
        batch, hidden = cal.parse_bucket(klass.size)
        module.hidden_size = hidden  # only the size bucket reads it here
        x = torch.zeros(2, batch, 4, dtype=cal.DTYPES[klass.dtype]).requires_grad_(klass.input_grad)
        lengths = torch.full((batch,), 2) if klass.lengths else None
        module.requires_grad_(klass.grad)
        assert cal.module_class(module, x, lengths) == klass
        assert cal.ClassKey.parse(str(klass)) == klass
        assert klass.table_prior(fastest) == FUSED.table_choice(module, x, lengths), klass


def test_the_input_gradient_is_a_class_of_its_own(measuring, monkeypatch):
    """Forward+backward with and without the input's gradient are measured apart (torch's op computes it
    either way, the fused backend only when asked), and the synthetic problem asks as the call does."""
    race = fake(monkeypatch, TORCH_FASTER, FUSED_FASTER)
    lstm, _, x = small_lstm_and_gru()
    lstm(x)  # the input without a gradient: the first measurement (torch faster)
    assert lstm.last_backend == "torch"
    xg = x.clone().requires_grad_()
    lstm(xg)[0].sum().backward()  # a class of its own: measured again (fused faster)
    assert lstm.last_backend == "fused" and xg.grad is not None and len(race.calls) == 2
    assert set(map(str, FUSED.calibrator().entries())) == {"lstm|float32|dense|fwd+bwd|N1H64",
                                                          "lstm|float32|dense|fwd+bwd+dx|N1H64"}
    assert cal.ClassKey.parse("lstm|float32|dense|fwd+bwd+dx|N1H64").input_grad
    fns = cal._synthetic(cal.ClassKey("lstm", "float32", False, True, "N1H64", True), 4)
    fns["fused"]()  # the synthetic input wants its gradient: no error, and it gets one
    assert cal.ClassKey("lstm", "float32", False, False, "N1H64", True).mode == "fwd"  # no grad: no input grad


@pytest.mark.parametrize("cold_s, repeats", [(0.01, cal.MAX_REPEATS), (0.03, cal.MAX_REPEATS),
                                             (0.05, cal.MAX_REPEATS), (0.3, cal.MIN_REPEATS)])
def test_a_cheap_class_sizes_its_rounds_by_a_warm_call(measuring, monkeypatch, cold_s, repeats):
    """The rounds are sized by each backend's call time: for a class whose cold first calls take under
    WARM_SIZING_S, by one warm call of each instead (a cold call overstates a round several times over: 10 ms
    cold, 1 ms warm gave 4 rounds by the cold calls, 7 now; 30-50 ms cold, the first class of a process,
    gave the 3-round minimum); a costlier class keeps the cold figure (300 ms each: the 3-round minimum,
    and no extra call)."""
    times = iter([cold_s, cold_s, 1e-3, 1e-3])  # the fake timer: cold fused, cold torch, then warm calls
    monkeypatch.setattr(cal._bench, "_time_calls", lambda fn, number: next(times))
    race = fake(monkeypatch, FUSED_FASTER)
    cal.measure(cal.ClassKey("lstm", "float32", False, True, "N1H64"))
    assert race.calls[0]["repeats"] == repeats
    assert len(list(times)) == (0 if 2 * cold_s < cal.WARM_SIZING_S else 2)  # warm calls: the cheap classes only


def test_size_buckets():
    """A class's size is the batch and hidden size rounded to powers of two (log scale), within limits."""
    assert cal.size_bucket(1, 64) == "N1H64" and cal.size_bucket(48, 500) == "N64H512"
    assert cal.size_bucket(3, 20) == "N4H16" and cal.size_bucket(8, 512) == "N8H512"
    assert cal.size_bucket(100_000, 3) == "N512H8" and cal.size_bucket(0, 10_000) == "N1H4096"
    assert cal.size_bucket(16, 128) != cal.size_bucket(8, 512)  # the two the S/M/L classes had merged
    assert cal.parse_bucket("N8H512") == (8, 512) and cal.parse_bucket("M") == (16, 128)
    for bad in ("N3H64", "N8H500", "N1024H64", "8x512", "N8H", "T"):
        assert cal.parse_bucket(bad) is None and cal.ClassKey.parse(f"lstm|float32|dense|fwd|{bad}") is None
    assert cal.bucket_name("L") == "N64H256" and cal.bucket_name("N6H300") == "N8H256"
    with pytest.raises(ValueError, match=r"a size is S, M, L or N<batch>H<hidden> \(e.g. N8H512\), got '8x512'"):
        cal.bucket_name("8x512")
    # the synthetic problem: the bucket's batch and hidden size, 16 to 64 steps (fewer for more work)
    small, large = (cal.ClassKey("lstm", "float32", False, True, s) for s in ("N1H64", "N128H1024"))
    assert cal.problem(small) == (1, 64, 64, cal.MAX_STEPS) and cal.problem(large) == (128, 1024, 1024, cal.MIN_STEPS)
    assert cal.problem_macs(large) == cal.MIN_STEPS * 128 * 4096 * 2048 * 3
    # the warm-up limit grows with the work: a large layer is measured even where its calls exceed MAX_WARMUP_S
    assert cal.warmup_limit(small, cal.MAX_STEPS, 0.5) == 0.5
    assert cal.warmup_limit(large, cal.MIN_STEPS, 0.5) == pytest.approx(cal.WARMUP_FACTOR * 2 * cal.problem_macs(large)
                                                            / cal.WARMUP_RATE)
    assert cal.warmup_limit(large, cal.MIN_STEPS, 0.5) > 10


def test_measure_mode_reads_the_environment(monkeypatch):
    for value, mode in [("1", "on"), ("", "on"), ("0", "off"), ("off", "off"), ("cached", "cached")]:
        monkeypatch.setenv(cal.MEASURE_ENV, value)
        assert cal.measure_mode() == mode
    monkeypatch.delenv(cal.MEASURE_ENV)
    assert cal.measure_mode() == "on"
    monkeypatch.setenv(cal.CACHE_ENV, "/some/where")
    assert str(cal.cache_dir()) == "/some/where"
    monkeypatch.delenv(cal.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert str(cal.cache_dir()) == "/xdg/rnnkit"


# ----------------------------------------------------------------------------- rnnkit calibrate and info


def test_rnnkit_calibrate_quick_writes_the_cache(measuring, capsys, tmp_path):
    report = tmp_path / "cal.json"
    code = cli.main(["calibrate", "--quick", "--family", "gru", "--mode", "train", "--mode", "infer",
                     "--json", str(report)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("family"))
    assert lines[header].split()[-3:] == ["torch/fused", "auto", "table"]
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [r[:5] for r in rows] == [["gru", "float32", "dense", "fwd+bwd", "N1H64"],
                                     ["gru", "float32", "dense", "fwd", "N1H64"]]
    assert all(r[-2] in ("fused", "torch") and r[-1] == "torch" for r in rows)  # table column: TABLE's gru S (N1H64)
    path = cal.cache_path()
    assert f"cache: {path}" in out
    choices = json.loads(path.read_text())["choices"]
    assert set(choices) == {"gru|float32|dense|fwd+bwd|N1H64", "gru|float32|dense|fwd|N1H64"}
    assert json.loads(report.read_text())["rows"][0]["class"] == "gru|float32|dense|fwd+bwd|N1H64"
    gru = rnnkit.GRU(32, 64)
    assert gru.which_backend(torch.randn(5, 1, 32)) == choices["gru|float32|dense|fwd+bwd|N1H64"]["best"]

    assert cli.main(["info"]) == 0
    assert f"measured on this machine (cache file {path}): 2 configuration classes" in capsys.readouterr().out
    assert cli.main(["calibrate", "--clear"]) == 0
    assert "removed" in capsys.readouterr().out and not path.exists()


def test_rnnkit_calibrate_no_write_and_errors(measuring, capsys, monkeypatch):
    assert cli.main(["calibrate", "--quick", "--family", "rnn_relu", "--no-write"]) == 0
    assert "cache: not written (--no-write)" in capsys.readouterr().out and not cal.cache_path().exists()
    code = cli.main(["calibrate", "--threads", "0"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.strip() == \
        "rnnkit calibrate: error: --threads must be >= 1, got 0 (see rnnkit calibrate --help)"
    code = cli.main(["calibrate", "--size", "8x512"])
    out, err = capsys.readouterr()
    assert code == 2 and err.strip() == ("rnnkit calibrate: error: --size: a size is S, M, L or N<batch>H<hidden> "
                                         "(e.g. N8H512), got '8x512' (see rnnkit calibrate --help)")
    code = cli.main(["calibrate", "--family", "indrnn"])
    assert code == 2 and "invalid choice: 'indrnn'" in capsys.readouterr().err
    monkeypatch.setenv("RNNKIT_DISABLE_FUSED", "1")
    code = cli.main(["calibrate", "--quick"])
    out, err = capsys.readouterr()
    assert code == 1 and "rnnkit calibrate: failed: CalibrateError: the fused backend is unavailable" in err


def test_rnnkit_calibrate_sizes_and_grid(measuring, capsys, monkeypatch):
    fake(monkeypatch, *([FUSED_FASTER] * 14))
    assert cli.main(["calibrate", "--family", "lstm", "--dtype", "float32", "--mode", "infer", "--input", "dense",
                     "--size", "N6H300", "--size", "S", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "2 classes" in out and "N8H256" in out and "N1H64" in out
    assert cli.main(["calibrate", "--family", "gru", "--dtype", "float32", "--mode", "infer", "--input", "dense",
                     "--grid", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert f"{len(cal.GRID_SIZES)} classes" in out and len(cal.GRID_SIZES) == 12
    assert all(size in out for size in ("N1H64", "N8H256", "N32H1024", "N128H1024"))


def test_info_says_where_the_choices_come_from(measuring, monkeypatch, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"nothing measured on this machine yet (cache file {cal.cache_path()})" in out
    assert "new classes are measured on first use" in out
    monkeypatch.setenv(cal.MEASURE_ENV, "0")
    assert cli.main(["info"]) == 0
    assert "auto     shipped table (auto_table.json, measured on the developers' CPU, 2 threads): " \
           "RNNKIT_AUTO_MEASURE=0 turns measuring off" in capsys.readouterr().out


def test_python_dash_m_rnnkit_calibrate_help():
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-m", "rnnkit", "calibrate", "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage: rnnkit calibrate" in res.stdout and "RNNKIT_AUTO_MEASURE" in res.stdout


# ----------------------------------------------------------------------------- benchmarks/auto_grid.py


def _auto_grid():
    import importlib.util
    spec = importlib.util.spec_from_file_location("auto_grid", os.path.join(ROOT, "benchmarks", "auto_grid.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_grid_covers_the_issue_grid():
    grid = _auto_grid()
    rows = grid.grid()
    assert len(rows) == 48  # cell x batch x hidden x mode, one shape each
    sizes = {(r["cell"], r["batch"], r["hidden"], r["mode"]) for r in rows}
    assert sizes == set(itertools.product(grid.CELLS, grid.BATCHES, grid.HIDDENS, grid.MODES))
    for key, values in (("length", grid.LENGTHS), ("layers", grid.LAYERS), ("dirs", grid.DIRECTIONS)):
        assert {r[key] for r in rows} == set(values)
        for batch in grid.BATCHES:  # every value with every batch and every hidden size
            assert {r[key] for r in rows if r["batch"] == batch} == set(values), (key, batch)
        for hidden in grid.HIDDENS:
            assert {r[key] for r in rows if r["hidden"] == hidden} == set(values), (key, hidden)
    small = dict(length=min(grid.LENGTHS), layers=1, dirs=1)
    assert all(grid.gmac(**r) <= 40 or all(r[k] == v for k, v in small.items()) for r in rows)
    assert len(grid.grid(full=True, max_gmac=1e9)) == 48 * 8
    # gmac: LSTM, one layer, one direction, forward: L * N * 4H * (H_in + H)
    assert grid.gmac("lstm", 2, 8, 5, 1, 1, "infer") == 5 * 2 * 32 * 16 / 1e9


def test_auto_grid_quick_run(monkeypatch, tmp_path, capsys):
    """The benchmark's smoke run: auto measures in a fresh cache, equals torch.nn, and is timed."""
    monkeypatch.setenv(cal.MEASURE_ENV, "0")  # main() sets both; monkeypatch restores them afterwards
    monkeypatch.setenv(cal.CACHE_ENV, str(tmp_path / "unused"))
    monkeypatch.setattr(FUSED, "_calibrator", None)
    threads = torch.get_num_threads()
    out = tmp_path / "grid.json"
    try:
        assert _auto_grid().main(["--quick", "--threads", "1", "--cache", str(tmp_path / "cache"),
                                  "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "worst auto/torch.nn" in printed
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 4 and result["machine"]["threads"] == 1
    for r in result["rows"]:
        assert r["picked"] in ("fused", "torch") and r["auto_ms"] > 0 and r["nn_ms"] > 0
        assert r["ratio"] == pytest.approx(r["auto_ms"] / r["nn_ms"]) and r["max_abs_err"] < 1e-3
    assert list((tmp_path / "cache").glob("auto-*.json"))  # auto measured there


def test_auto_grid_times_rows_over_the_target_again(monkeypatch, tmp_path, capsys):
    """--confirm: each row over the target is timed again (fresh modules, the same cache); the last line
    gives the worst row after that, and the JSON keeps both figures. Here every row is "over" (target 0)."""
    grid = _auto_grid()
    monkeypatch.setattr(grid, "TARGET", 0.0)
    monkeypatch.setenv(cal.MEASURE_ENV, "0")
    monkeypatch.setenv(cal.CACHE_ENV, str(tmp_path / "unused"))
    monkeypatch.setattr(FUSED, "_calibrator", None)
    threads = torch.get_num_threads()
    out = tmp_path / "grid.json"
    try:
        assert grid.main(["--quick", "--threads", "1", "--cache", str(tmp_path / "cache"), "--json", str(out),
                          "--both"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "timing the 4 rows over 0.0 again, 2 rounds each:" in printed
    assert "after confirming: worst auto/torch.nn" in printed and "4 of 4 rows over 0.0" in printed
    for r in json.loads(out.read_text())["rows"]:
        c = r["confirmed"]
        assert c["picked"] == r["picked"] and c["ratio"] == pytest.approx(c["auto_ms"] / c["nn_ms"])
        assert c["torch_ms"] > 0


# ----------------------------------------------------------------------------- auto remembers its choice per module


def test_a_settled_choice_is_remembered_and_dropped_by_any_change(measuring, monkeypatch):
    """select() keeps auto's measured choice in the module (rnnkit.backends.AUTO_CHOICE) and takes it
    again for the same kind of call; an attribute change, .to(), another grad mode, another batch
    or a new measurement decide afresh."""
    from rnnkit import backends
    plans = []
    plan = backends._auto_plan
    monkeypatch.setattr(backends, "_auto_plan", lambda *a: plans.append(1) or plan(*a))
    fake(monkeypatch, TORCH_FASTER, FUSED_FASTER, FUSED_FASTER, TORCH_FASTER)
    torch.manual_seed(0)
    lstm = rnnkit.LSTM(32, 64, num_layers=2)  # two layers: no direct inference entry under no_grad
    x = torch.randn(5, 1, 32)
    lstm(x)
    assert lstm.last_backend == "torch" and len(plans) == 1
    for _ in range(3):
        lstm(x)
    assert len(plans) == 1 and lstm.last_backend == "torch"  # remembered
    lstm(torch.randn(7, 1, 32))  # another length: the same choice
    assert len(plans) == 1
    with torch.no_grad():  # another class: measured, fused
        lstm(x)
    assert len(plans) == 2 and lstm.last_backend == "fused"
    lstm(x)  # back to grad: the key differs, the class was measured: no new race
    assert len(plans) == 3 and lstm.last_backend == "torch"
    lstm.eval()  # any attribute set drops it
    assert backends.AUTO_CHOICE not in lstm.__dict__
    lstm(x)
    assert len(plans) == 4
    lstm.double()  # .to(): dropped, and float64 is a class of its own (measured: fused)
    assert backends.AUTO_CHOICE not in lstm.__dict__
    lstm(x.double())
    assert len(plans) == 5 and lstm.last_backend == "fused"
    lstm(x.double())
    assert len(plans) == 5
    lstm(torch.randn(5, 16, 32, dtype=torch.float64))  # another batch bucket: measured (torch)
    assert len(plans) == 6 and lstm.last_backend == "torch"
    # a measurement changes what lookup() answers: the remembered choice is not trusted past it
    FUSED.calibrator().record(cal.module_class(lstm, torch.randn(5, 16, 32, dtype=torch.float64), None),
                              {"best": "fused", "how": "measured"}, persist=False)
    lstm(torch.randn(5, 16, 32, dtype=torch.float64))
    assert len(plans) == 7 and lstm.last_backend == "fused"
    # pickling and copies do not carry it
    import copy
    assert backends.AUTO_CHOICE in lstm.__dict__
    assert copy.deepcopy(lstm).__dict__.get(backends.AUTO_CHOICE) is None


def test_an_unsettled_choice_is_not_remembered(measuring, monkeypatch):
    """Where auto could not measure yet (here: measuring is 'cached', nothing cached), each call decides
    again, so the first call that may measure does."""
    from rnnkit import backends
    monkeypatch.setenv(cal.MEASURE_ENV, "cached")
    race = fake(monkeypatch, TORCH_FASTER)
    torch.manual_seed(0)
    lstm, x = rnnkit.LSTM(32, 64, num_layers=2), torch.randn(5, 1, 32)
    lstm(x)
    assert lstm.last_backend == "fused" and backends.AUTO_CHOICE not in lstm.__dict__  # the table: fused
    monkeypatch.setenv(cal.MEASURE_ENV, "1")
    lstm(x)
    assert len(race.calls) == 1 and lstm.last_backend == "torch" and backends.AUTO_CHOICE in lstm.__dict__


def test_the_remembered_choice_gives_the_same_results(measuring, monkeypatch):
    fake(monkeypatch, FUSED_FASTER)
    torch.manual_seed(0)
    lstm, x = rnnkit.LSTM(32, 64, num_layers=2), torch.randn(5, 3, 32, requires_grad=True)
    ref = rnnkit.LSTM(32, 64, num_layers=2, backend="reference")
    ref.load_state_dict(lstm.state_dict())
    for _ in range(2):  # measured, then remembered
        out, (h, c) = lstm(x)
        grads = torch.autograd.grad(out.sum() + h.sum() + c.sum(), (x, *lstm.parameters()))
        assert lstm.last_backend == "fused"
        out_r, (h_r, c_r) = ref(x)
        grads_r = torch.autograd.grad(out_r.sum() + h_r.sum() + c_r.sum(), (x, *ref.parameters()))
        torch.testing.assert_close(out, out_r)
        for g, g_r in zip(grads, grads_r):
            torch.testing.assert_close(g, g_r, rtol=1e-4, atol=1e-5)


def test_the_cache_key_holds_the_python_between_call_and_kernel():
    """A change to the layer/runner/op glue measures afresh (a small call's time is mostly theirs)."""
    assert dict(cal._static_key())["python"] == cal._glue_hash()
    root = os.path.join(ROOT, "rnnkit")
    assert all(os.path.exists(os.path.join(root, name)) for name in cal.GLUE)


def test_a_verdict_far_against_the_table_is_raced_again(measuring, monkeypatch):
    """More than STALL times against the shipped table's choice: a second race, each backend keeping its
    faster median (a burst of load through the first race no longer decides); within STALL, or with
    the table, one race."""
    stalled = {"fused": 131e-3, "torch": 8e-3}
    race = fake(monkeypatch, stalled, {"fused": 4e-3, "torch": 8.5e-3})
    lstm, gru, x = small_lstm_and_gru()  # the table: lstm S fused
    assert lstm.which_backend(x) == "fused" and len(race.calls) == 2
    entry = FUSED.calibrator().lookup(cal.module_class(lstm, x, None))
    assert entry["raced"] == 2 and entry["fused_ms"] == pytest.approx(4) and entry["torch_ms"] == pytest.approx(8)
    # confirmed by the second race: the measurement wins over the table
    race = fake(monkeypatch, stalled, stalled)
    lstm2 = rnnkit.LSTM(32, 64, dtype=torch.float64)
    assert lstm2.which_backend(x.double()) == "torch" and len(race.calls) == 2
    # against the table by less than STALL, or with it: one race
    race = fake(monkeypatch, {"fused": 2.9e-3, "torch": 1e-3}, {"fused": 131e-3, "torch": 1e-3})
    assert rnnkit.LSTM(32, 64)(torch.randn(5, 3, 32)) is not None and len(race.calls) == 1  # N4H64: torch
    assert gru.which_backend(x) == "torch" and len(race.calls) == 2  # the table says torch: no second race
    assert "raced" not in FUSED.calibrator().lookup(cal.module_class(gru, x, None))
