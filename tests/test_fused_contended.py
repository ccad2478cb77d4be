"""``rnnkit bench --contended`` (rnnkit/fused/under_load.py): fused vs torch.nn forward+backward,
idle and with busy processes, at a tiny size (the figures mean little; the timing targets live in
the benchmark, not in tests)."""

from __future__ import annotations

import json

import pytest

from rnnkit import cli
from rnnkit.fused import _build, under_load

needs_fused = pytest.mark.skipif(_build.load() is not None, reason="fused extension unavailable")


@needs_fused
def test_bench_contended_runs_idle_and_loaded(tmp_path, capsys):
    path = tmp_path / "contended.json"
    code = cli.main(["bench", "--contended", "--quick", "--busy", "1", "--quiet", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "| RNN N=1 H=32 T=10 |" in out and "target (loaded ratio >= 0.8" in out
    result = json.loads(path.read_text())
    assert result["busy"] == 1 and list(result["rows"]) == ["rnn_s"]
    for phase in ("idle", "loaded"):
        row = result["rows"]["rnn_s"][phase]
        assert row["fused_ms"] > 0 and row["torch_ms"] > 0
    # the busy processes ran (as the loaded phase's children) and are gone
    assert result["cores_loaded"]["busy_processes"] > 0


def test_contended_rows_are_the_s_and_m_comparisons():
    sizes = {under_load.CONFIGS[name][1:3] for name in under_load.CONTENDED}
    assert (1, 32) in sizes and (1, 64) in sizes and (16, 128) in sizes  # batch-1 RNN, S, M
    assert under_load.CONFIGS["rnn_s"] == ("RNN", 1, 32, 10)


def test_bench_contended_refuses_no_busy_process(capsys):
    assert cli.main(["bench", "--contended", "--busy", "0"]) == 2
    err = capsys.readouterr().err
    assert "--busy must be at least 1 busy process, got 0" in err


@pytest.mark.parametrize("argv, samples", [([], 15), (["--repeats", "7"], 21)])
def test_bench_contended_default_run_settings(monkeypatch, capsys, argv, samples):
    """The full run's settings (without --quick): the S and M rows, 15 samples per backend and phase
    unless --repeats asks for more (the run itself is the benchmark's, minutes long: faked here)."""
    seen = {}

    def fake_run(configs, busy, n_samples, sample_ms, threads, **kw):
        seen.update(configs=configs, busy=busy, samples=n_samples)
        return {"fake": True}

    monkeypatch.setattr(under_load, "run", fake_run)
    monkeypatch.setattr(under_load, "format_table", lambda result: "table")
    monkeypatch.setattr("rnnkit.bench._fused_reason", lambda: None)
    assert cli.main(["bench", "--contended", *argv]) == 0
    assert seen == {"configs": under_load.CONTENDED, "busy": 3, "samples": samples}
    assert capsys.readouterr().out.strip() == "table"
