"""`rnnkit demo`: each task on a tiny setting (result line, PNG, --save), reproducibility,
the data against hand-written formulas; the full runs' accuracy in slow tests."""

from __future__ import annotations

import os
import re

import pytest
import torch

import rnnkit
from rnnkit import cli, demo
from rnnkit.registry import LayerEntry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # something was drawn


def _digits_split(seed):
    """Independent re-creation of the held-out split the demo documents (last 20% of a seeded permutation)."""
    from sklearn.datasets import load_digits
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test = order[: len(images) // 5]
    return images[test], labels[test]


# ----------------------------------------------------------------------------- each task, tiny


def test_digits_tiny_result_line_png_and_loadable_state_dict(capsys, tmp_path):
    save = tmp_path / "m" / "digits.pt"
    code, out, _ = run_cli(capsys, "demo", "--task", "digits", "--epochs", "1", "--hidden-size", "16", "--out",
                           str(tmp_path), "--save", str(save), "--quiet", "--seed", "3")
    assert code == 0
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"result: digits: lstm test accuracy (\d\.\d{4}) \((\d+)/(\d+) held-out images\) "
                     r"after 1 epochs \(\d+\.\d s\)", last)
    assert m, last
    assert_png(tmp_path / "digits.png")
    # the saved state_dict loads into the documented model and reproduces the reported accuracy
    state = torch.load(save)
    net = demo.make_net("lstm", 8, 16, 10, "auto", every_step=False)
    net.load_state_dict(state)
    x, y = _digits_split(3)
    with torch.no_grad():
        correct = int((net(x)[0].argmax(1) == y).sum())
    assert (correct, len(y)) == (int(m.group(2)), int(m.group(3)))
    assert float(m.group(1)) == pytest.approx(correct / len(y), abs=5e-5)


def test_sine_tiny(capsys, tmp_path):
    save = tmp_path / "sine.pt"
    code, out, _ = run_cli(capsys, "demo", "--task", "sine", "--steps", "3", "--out", str(tmp_path), "--save",
                           str(save), "--quiet")
    assert code == 0
    assert re.search(r"^result: sine: rnn predicts cos from sin with test MSE \d+\.\d{5} over 20 unseen windows "
                     r"\(after 3 training windows\)", out, re.M), out
    assert_png(tmp_path / "sine.png")
    state = torch.load(save)
    assert state["rnn.weight_ih_l0"].shape == (32, 1) and state["head.weight"].shape == (1, 32)


def test_adding_tiny_compares_the_cells(capsys, tmp_path):
    save = tmp_path / "adding.pt"
    code, out, _ = run_cli(capsys, "demo", "--task", "adding", "--cell", "rnn", "--cell", "gru", "--steps", "2",
                           "--seq-len", "12", "--hidden-size", "8", "--out", str(tmp_path), "--save", str(save),
                           "--quiet")
    assert code == 0
    assert re.search(r"^result: adding \(length 12\): test MSE rnn \d\.\d{4}, gru \d\.\d{4} \(predicting the mean "
                     r"scores 0\.1667\); best: (rnn|gru)", out, re.M), out
    assert_png(tmp_path / "adding.png")
    state = torch.load(save)
    assert {k.split(".")[0] for k in state} == {"rnn", "gru"}
    assert state["gru.rnn.weight_hh_l0"].shape == (24, 8)


def test_progress_bar_shows_running_loss(capsys, tmp_path):
    code, _, err = run_cli(capsys, "demo", "--task", "sine", "--steps", "3", "--out", str(tmp_path))
    assert code == 0
    assert "sine/rnn" in err and re.search(r"loss=\d+\.\d{4}", err)


def test_progress_is_sparse_when_stderr_is_not_a_terminal(capsys, tmp_path):
    """Not a terminal (capsys, a pipe, a CI log): the bar is drawn at the start and at the end
    (with the running loss), not once per step."""
    code, _, err = run_cli(capsys, "demo", "--task", "sine", "--steps", "60", "--out", str(tmp_path))
    assert code == 0
    draws = [d for d in err.replace("\n", "\r").split("\r") if "sine/rnn" in d]
    assert 1 <= len(draws) <= 3, draws
    assert "60/60" in draws[-1] and re.search(r"loss=\d+\.\d{4}", draws[-1])


# ----------------------------------------------------------------------------- reproducibility, cells


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    kw = dict(epochs=1, hidden_size=8, out=str(tmp_path), quiet=True)
    a = demo.run("digits", seed=5, **kw)
    b = demo.run("digits", seed=5, **kw)
    c = demo.run("digits", seed=6, **kw)
    assert a["losses"] == b["losses"] and a["accuracy"] == b["accuracy"]
    assert a["losses"] != c["losses"]
    for ka, kb in zip(a["model"].state_dict().values(), b["model"].state_dict().values()):
        assert torch.equal(ka, kb)


@pytest.mark.parametrize("name", sorted(n for n, e in rnnkit.LAYERS.items() if e.spatial is None))
def test_every_vector_layer_runs_the_demo(tmp_path, name):
    res = demo.run("sine", [name], steps=2, hidden_size=8, out=str(tmp_path), quiet=True)
    assert type(res["model"].rnn) is rnnkit.LAYERS[name].layer
    assert len(res["losses"]) == 2 and all(torch.isfinite(torch.tensor(res["losses"])))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_backend_is_used(tmp_path, backend):
    res = demo.run("sine", ["lstm"], backend=backend, steps=2, hidden_size=8, out=str(tmp_path), quiet=True)
    assert res["model"].rnn.last_backend == backend


def test_threads_are_restored(tmp_path):
    before = torch.get_num_threads()
    demo.run("sine", steps=1, threads=1, out=str(tmp_path), quiet=True)
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("argv, message", [
    (["--task", "sine", "--epochs", "2"], "--epochs does not apply to the sine task (it takes --hidden-size, --steps)"),
    (["--task", "digits", "--cell", "gru", "--cell", "lstm"], "the digits task trains one cell, got 2"),
    (["--task", "nope"], "argument --task: invalid choice: 'nope'"),
    (["--cell", "nope"], "argument --cell: invalid choice: 'nope'"),
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--task", "adding", "--seq-len", "1"], "--seq-len must be at least 2, got 1"),
    (["--backend", "fused"] if "fused" not in rnnkit.BACKENDS else ["--backend", "nope"],
     "backend='fused' cannot run this configuration" if "fused" not in rnnkit.BACKENDS
     else "argument --backend: invalid choice"),
])
def test_demo_bad_arguments_exit_2_before_training(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, "demo", *argv, "--out", str(tmp_path / "never"), "--quiet")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("rnnkit demo: error: ")
    assert message in err
    assert not (tmp_path / "never").exists()


def test_spatial_layer_is_refused_with_the_reason(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(rnnkit.LAYERS, "fake_conv", LayerEntry("fake_conv", rnnkit.LSTM, spatial=(4, 4)))
    with pytest.raises(demo.DemoArgumentError, match="cell 'fake_conv' takes spatial inputs .*pick a vector cell"):
        demo.run("sine", ["fake_conv"], steps=1, out=str(tmp_path), quiet=True)


# ----------------------------------------------------------------------------- the data


def test_adding_batch_against_its_definition():
    x, y = demo.adding_batch(50, 20, torch.Generator().manual_seed(0))
    assert x.shape == (50, 20, 2) and y.shape == (50, 1)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert (markers.sum(1) == 2).all() and set(markers.unique().tolist()) == {0.0, 1.0}
    assert (markers[:, :10].sum(1) == 1).all() and (markers[:, 10:].sum(1) == 1).all()
    for n in range(50):
        i, j = markers[n].nonzero().flatten().tolist()
        assert y[n, 0].item() == pytest.approx(values[n, i].item() + values[n, j].item(), abs=1e-6)


def test_docs_python_examples_run(tmp_path, monkeypatch):
    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cli.md")
    with open(doc) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, doc, "exec"), {})
    assert (tmp_path / "digits.pt").exists() and (tmp_path / "rnnkit-out" / "digits.png").exists()


# ----------------------------------------------------------------------------- full runs (slow)


@pytest.mark.slow
def test_default_demo_digits_reaches_95_percent(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "demo", "--out", str(tmp_path), "--quiet")
    assert code == 0
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", out).group(1))
    assert accuracy >= 0.95, out
    assert_png(tmp_path / "digits.png")


@pytest.mark.slow
def test_sine_demo_mse_below_001(tmp_path):
    res = demo.run("sine", out=str(tmp_path), quiet=True)
    assert res["mse"] < 0.01, res["result"]


@pytest.mark.slow
def test_adding_gated_cells_beat_the_mean_and_the_plain_rnn(tmp_path):
    res = demo.run("adding", out=str(tmp_path), quiet=True)
    baseline = 1 / 6
    assert res["mse"]["gru"] < 0.1 * baseline and res["mse"]["lstm"] < 0.1 * baseline, res["result"]
    assert res["mse"]["rnn"] > 2 * max(res["mse"]["gru"], res["mse"]["lstm"]), res["result"]


# ----------------------------------------------------------------------------- the first-use compile


def _fake_build(monkeypatch):
    """rnnkit.fused.load replaced by a stand-in that announces itself as the real build does and waits
    (up to 60 s) for the demo's warm-up to start, so that it can only finish if the two overlap."""
    import sys
    import threading
    import rnnkit.fused
    seen = {"done": False, "overlapped": False, "thread": None}
    warm_started = threading.Event()

    def fake_load():
        seen["thread"] = threading.current_thread().name
        print("rnnkit: compiling the fused CPU kernels (fake)...", file=sys.stderr, flush=True)
        seen["overlapped"] = warm_started.wait(60)
        print("rnnkit: fused CPU kernels ready (0 s)", file=sys.stderr, flush=True)
        seen["done"] = True

    real_warm_up = demo._warm_up

    def warm_up(task):
        warm_started.set()
        real_warm_up(task)

    monkeypatch.setattr(rnnkit.fused, "load", fake_load)
    monkeypatch.setattr(demo, "_warm_up", warm_up)
    return seen


def test_the_build_overlaps_the_warm_up_and_ends_before_training_and_the_bar(monkeypatch, capsys, tmp_path):
    seen = _fake_build(monkeypatch)
    real_digits, at_training = demo.digits, {}

    def digits(*args, **kwargs):
        at_training["built"] = seen["done"]
        return real_digits(*args, **kwargs)

    monkeypatch.setattr(demo, "digits", digits)
    res = demo.run("digits", epochs=1, hidden_size=8, out=str(tmp_path), quiet=False)
    err = capsys.readouterr().err
    assert seen["thread"] == "rnnkit-fused-build" and seen["overlapped"]
    assert at_training == {"built": True}  # the compile is not training time
    assert err.index("compiling the fused CPU kernels") < err.index("ready (0 s)") < err.index("digits/lstm")
    assert 0 <= res["accuracy"] <= 1


def test_a_failing_warm_up_still_waits_for_the_build(monkeypatch, tmp_path):
    seen = _fake_build(monkeypatch)
    real_warm_up = demo._warm_up

    def warm_up(task):
        try:
            real_warm_up(task)  # the stand-in: sets the event the fake build waits for
        finally:
            raise ImportError("No module named 'sklearn' (simulated)")

    monkeypatch.setattr(demo, "_warm_up", warm_up)
    with pytest.raises(ImportError, match="simulated"):
        demo.run("digits", epochs=1, hidden_size=8, out=str(tmp_path), quiet=True)
    assert seen["done"] and seen["overlapped"]


def test_the_warm_up_draws_no_random_numbers():
    before = torch.get_rng_state()
    for task in demo.TASKS:
        demo._warm_up(task)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_no_build_and_no_warm_up_without_the_fused_backend(monkeypatch, tmp_path, backend):
    seen = _fake_build(monkeypatch)
    demo.run("sine", ["rnn"], backend=backend, steps=2, hidden_size=8, out=str(tmp_path), quiet=True)
    assert seen["thread"] is None
