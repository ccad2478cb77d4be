"""The command line: help, exit codes, `info` and `explain` (oracles: the objects the
commands describe, built directly, and real forward passes)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


# ----------------------------------------------------------------------------- help and exit codes


def test_top_help_names_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("demo", "explain", "bench", "info"):
        assert f"\n    {command} " in out and f"\n  {command} " in out, command


@pytest.mark.parametrize("command", ["demo", "explain", "bench", "info"])
def test_command_help_describes_every_option(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    sub = _subparsers(cli.build_parser())[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in out, f"{command} --help does not mention {flag}"
        if action.option_strings and action.help != argparse.SUPPRESS:
            assert action.help, f"{command} {action.option_strings} has no help text"


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 0 and "COMMAND" in out and "explain" in out


def test_unknown_command_is_a_one_line_usage_error(capsys):
    code, out, err = run_cli(capsys, "trian")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "invalid choice: 'trian'" in err


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and rnnkit.__version__ in out and torch.__version__ in out


def test_python_dash_m_is_the_same_program():
    env = {**os.environ, "PYTHONPATH": ROOT}
    ok = subprocess.run([sys.executable, "-m", "rnnkit", "info"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0].startswith(f"rnnkit   {rnnkit.__version__}")
    assert os.path.join(ROOT, "rnnkit") in ok.stdout  # it ran this checkout
    bad = subprocess.run([sys.executable, "-m", "rnnkit", "explain", "lstm", "--input-size", "x", "--hidden-size",
                          "4"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("rnnkit explain: error: argument --input-size: expected a positive integer, "
                                  "got 'x' (see rnnkit explain --help)")


# ----------------------------------------------------------------------------- info


def test_info_reports_versions_threads_and_backends(capsys):
    code, out, _ = run_cli(capsys, "info")
    assert code == 0
    assert f"torch    {torch.__version__}" in out
    assert f"threads  {torch.get_num_threads()} intra-op" in out
    assert f"{os.cpu_count()} logical cores" in out
    for name, status in rnnkit.describe_backends().items():
        assert f"  {name:<10} {status}" in out
    assert ", ".join(sorted(rnnkit.LAYERS)) in out


# ------------------------------------------------------------- explain: usage errors (no explainer needed)


@pytest.mark.parametrize("argv, message", [
    (["explain", "lstm", "--input-size", "0", "--hidden-size", "4"],
     "argument --input-size: expected a positive integer, got 0"),
    (["explain", "lstm", "--input-size", "3"], "the following arguments are required: --hidden-size"),
    (["explain", "nope", "--input-size", "3", "--hidden-size", "4"], "argument LAYER: invalid choice: 'nope'"),
    (["explain", "gru", "--input-size", "3", "--hidden-size", "4", "--proj-size", "2"],
     "GRU: proj_size is only supported by LSTM (got proj_size=2)"),
    (["explain", "lstm", "--input-size", "3", "--hidden-size", "4", "--proj-size", "4"],
     "LSTM: proj_size must be smaller than hidden_size, got proj_size=4 and hidden_size=4"),
    (["explain", "lstm", "--input-size", "3", "--hidden-size", "4", "--shape", "3,a"],
     "argument --shape: expected comma-separated integers"),
])
def test_explain_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("rnnkit explain: error: ") and message in err


def test_explain_without_explainer_fails_with_exit_1(capsys, monkeypatch):
    real = importlib.import_module

    def no_explain(name, *a, **k):
        if name == "rnnkit.explain":
            raise ImportError("no module named rnnkit.explain")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_explain)
    code, _, err = run_cli(capsys, "explain", "lstm", "--input-size", "3", "--hidden-size", "4")
    assert code == 1 and "rnnkit.explain is missing" in err


# ------------------------------------------------------------- explain: the table (needs rnnkit.explain)


def _real_shapes(module, shape):
    """The oracle: run the module and read the shapes it returns."""
    with torch.no_grad():
        out, h = module(torch.randn(shape))
    states = h if isinstance(h, tuple) else (h,)
    return [tuple(out.shape)] + [tuple(s.shape) for s in states]


def _explained_shapes(capsys, *argv):
    code, out, err = run_cli(capsys, "explain", *argv, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["ok"] is True
    return d, [tuple(o["shape"]) for o in d["outputs"]]


def test_explain_two_layer_bidirectional_batch_first_lstm(capsys):
    explain_mod = pytest.importorskip("rnnkit.explain")
    argv = ["lstm", "--input-size", "50", "--hidden-size", "100", "--num-layers", "2", "--seq-len", "10",
            "--batch", "3", "--batch-first", "--bidirectional"]
    code, table, _ = run_cli(capsys, "explain", *argv)
    assert code == 0
    module = rnnkit.LSTM(50, 100, num_layers=2, batch_first=True, bidirectional=True)
    assert table.strip() == str(explain_mod.explain(module, (3, 10, 50))).strip()
    assert "h_n     (4, 3, 100)" in table and "c_n     (4, 3, 100)" in table
    torch_lstm = torch.nn.LSTM(50, 100, num_layers=2, batch_first=True, bidirectional=True)
    d, shapes = _explained_shapes(capsys, *argv)
    assert shapes == _real_shapes(torch_lstm, (3, 10, 50)) == [(3, 10, 200), (4, 3, 100), (4, 3, 100)]
    assert d["total_parameters"] == sum(p.numel() for p in torch_lstm.parameters())


@pytest.mark.parametrize("extra, shape", [
    ([], (7, 2, 5)),
    (["--batch-first"], (2, 7, 5)),
    (["--unbatched"], (7, 5)),
    (["--proj-size", "3", "--num-layers", "2", "--bidirectional"], (7, 2, 5)),
])
def test_explain_lstm_layouts_match_a_real_forward(capsys, extra, shape):
    pytest.importorskip("rnnkit.explain")
    base = ["lstm", "--input-size", "5", "--hidden-size", "6", "--seq-len", "7", "--batch", "2"]
    _, shapes = _explained_shapes(capsys, *base, *extra)
    kwargs = dict(batch_first="--batch-first" in extra, bidirectional="--bidirectional" in extra,
                  num_layers=2 if "--num-layers" in extra else 1, proj_size=3 if "--proj-size" in extra else 0)
    assert shapes == _real_shapes(torch.nn.LSTM(5, 6, **kwargs), shape)


@pytest.mark.parametrize("name", sorted(rnnkit.LAYERS))
def test_explain_works_for_every_registered_layer(capsys, name):
    pytest.importorskip("rnnkit.explain")
    entry = rnnkit.LAYERS[name]
    d, shapes = _explained_shapes(capsys, name, "--input-size", "3", "--hidden-size", "4", "--num-layers", "2",
                                  "--seq-len", "5", "--batch", "2")
    module = entry.make(3, 4, num_layers=2)
    assert shapes == _real_shapes(module, entry.input_shape(5, 2, 3))
    assert d["total_parameters"] == sum(p.numel() for p in module.parameters())


def test_explain_a_shape_that_does_not_fit_says_why_and_exits_1(capsys):
    pytest.importorskip("rnnkit.explain")
    code, out, _ = run_cli(capsys, "explain", "lstm", "--input-size", "50", "--hidden-size", "100",
                           "--shape", "3,10,49")
    assert code == 1
    assert "does not fit" in out and "input_size=50" in out and "fix:" in out
    with pytest.raises(ValueError, match="input_size=50"):  # the layer itself refuses the same input
        rnnkit.LSTM(50, 100)(torch.randn(3, 10, 49))
