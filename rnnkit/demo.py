"""``rnnkit demo``: the classic RNN tutorial models, trained on real data.

Three tasks, each a short straight-line script:

* ``sine``: an :class:`rnnkit.RNN` (hidden 32, ``batch_first``) reads ``sin`` and
  predicts ``cos`` with a ``Linear(32, 1)`` at every step; the hidden state is
  carried from one window to the next and detached between windows.
* ``digits``: an :class:`rnnkit.LSTM` (hidden 64, ``batch_first``) reads each 8x8
  handwritten digit of scikit-learn (shipped with the package, loads offline)
  one row per time step; ``Linear(64, 10)`` on ``r_out[:, -1, :]`` classifies it.
* ``adding``: the adding problem of Hochreiter and Schmidhuber (1997): a sequence
  of (value, marker) pairs, predict the sum of the two marked values; RNN, GRU
  and LSTM side by side.

Every task takes ``cell`` (any name in :data:`rnnkit.LAYERS`) and ``backend``,
is reproducible under ``seed``, writes a PNG to ``out`` and returns a dict whose
``"result"`` is the one-line summary the command line prints.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .registry import get_layer

TASKS = ("digits", "sine", "adding")
DEFAULT_CELLS = {"sine": ["rnn"], "digits": ["lstm"], "adding": ["rnn", "gru", "lstm"]}


class DemoArgumentError(ValueError):
    """An argument of :func:`run` that cannot work (the command line exits with code 2)."""


class Net(nn.Module):
    """A recurrent layer and a linear head, on every step (``every_step``) or on the last one."""

    def __init__(self, rnn: nn.Module, head: nn.Linear, every_step: bool):
        super().__init__()
        self.rnn, self.head, self.every_step = rnn, head, every_step

    def forward(self, x, h=None):
        r_out, h = self.rnn(x, h)
        return self.head(r_out if self.every_step else r_out[:, -1, :]), h


def make_net(cell: str, input_size: int, hidden_size: int, out_size: int, backend: str, every_step: bool) -> Net:
    entry = get_layer(cell)
    if entry.spatial is not None:
        raise ValueError(f"cell {cell!r} takes spatial inputs (L, N, C, {', '.join('HW'[:len(entry.spatial)])}); "
                         "the demo tasks read vectors; pick a vector cell such as 'lstm'")
    rnn = entry.make(input_size, hidden_size, batch_first=True, backend=backend)
    return Net(rnn, nn.Linear(hidden_size, out_size), every_step)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _warm_up(task: str) -> None:
    """Pays now the one-time costs of the task's first use of its libraries, which the training would
    otherwise pay: importing scikit-learn's datasets (digits), matplotlib and tqdm, and torch.optim's
    first optimizer calls (torch imports torch._dynamo for them: ~3 s). Changes no state the task reads
    (no random numbers drawn; the optimizer has a parameter of its own, without a gradient)."""
    if task == "digits":
        from sklearn.datasets import load_digits  # noqa: F401
    _plt()
    from tqdm.auto import tqdm  # noqa: F401
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    opt.zero_grad()
    opt.step()  # no gradient: a no-op, but the first step's imports happen


def _load_fused_meanwhile(task: str) -> None:
    """Builds (or loads) the fused kernels with their own messages, while :func:`_warm_up` runs here:
    a first-use compile is a ninja subprocess (the GIL stays free), so the task's imports overlap it
    instead of following it. Returns when both are done, before any training or progress bar."""
    from .fused import load as _load_fused

    builder = threading.Thread(target=_load_fused, name="rnnkit-fused-build", daemon=True)
    builder.start()
    try:
        _warm_up(task)
    finally:
        builder.join()


def _bar(total: int, desc: str, quiet: bool):
    """The progress bar on stderr: redrawn at most 10 times a second on a terminal; elsewhere (a
    log file, a pipe, CI) a line every 30 s and the final one, not a redraw per step. The loss is
    set with ``refresh=False`` so it never forces a redraw of its own."""
    import sys

    from tqdm.auto import tqdm
    tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, disable=quiet, dynamic_ncols=True, mininterval=0.1 if tty else 30.0,
                file=sys.stderr)


def detach(h):
    return tuple(s.detach() for s in h) if isinstance(h, tuple) else h.detach()


# ----------------------------------------------------------------------------- sine -> cos


def sine(cell="rnn", backend="auto", steps=300, hidden_size=32, seed=0, out="rnnkit-out", quiet=False) -> Dict:
    torch.manual_seed(seed)
    window, lr, test_windows = 20, 0.01, 20
    net = make_net(cell, 1, hidden_size, 1, backend, every_step=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def curve(k):  # window k covers [k*pi, (k+1)*pi): input sin, target cos, shape (1, window, 1)
        t = torch.linspace(k * math.pi, (k + 1) * math.pi, window + 1)[:-1]
        return torch.sin(t).view(1, -1, 1), torch.cos(t).view(1, -1, 1), t

    losses, h = [], None
    bar = _bar(steps, f"sine/{cell}", quiet)
    for k in range(steps):
        x, y, _ = curve(k)
        pred, h = net(x, h)
        h = detach(h)  # carry the state to the next window, cut the graph
        loss = nn.functional.mse_loss(pred, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", refresh=False)
    bar.close()

    with torch.no_grad():  # keep going along the curve, still carrying the state
        ts, ys, ps = [], [], []
        for k in range(steps, steps + test_windows):
            x, y, t = curve(k)
            pred, h = net(x, h)
            ts.append(t)
            ys.append(y.flatten())
            ps.append(pred.flatten())
        t, y, p = torch.cat(ts).numpy(), torch.cat(ys).numpy(), torch.cat(ps).numpy()
        mse = float(((p - y) ** 2).mean())

    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 3.5))
    ax.plot(t, np.sin(t), color="0.7", label="input sin(t)")
    ax.plot(t, y, "b-", label="target cos(t)")
    ax.plot(t, p, "r--", label=f"prediction ({cell})")
    ax.set(title=f"sine -> cos, {cell}: test MSE {mse:.5f}", xlabel="t")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plot = _save_fig(fig, out, "sine.png")
    result = f"sine: {cell} predicts cos from sin with test MSE {mse:.5f} over {test_windows} unseen windows " \
             f"(after {steps} training windows)"
    return dict(task="sine", result=result, mse=mse, losses=losses, plot=plot, model=net)


# ----------------------------------------------------------------------------- digits, one row per step


def digits(cell="lstm", backend="auto", epochs=15, hidden_size=64, seed=0, out="rnnkit-out", quiet=False,
           batch_size=32, lr=0.01) -> Dict:
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    data = load_digits()  # 1797 images, 8x8, grey levels 0..16
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # (n, 8 rows = L, 8 columns = H_in)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_test = len(images) // 5
    test_idx, train_idx = order[:n_test], order[n_test:]
    x_test, y_test = images[test_idx], labels[test_idx]

    net = make_net(cell, images.shape[2], hidden_size, 10, backend, every_step=False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    batches = math.ceil(len(train_idx) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * batches)
    curve: Dict[str, List[float]] = {"train loss": [], "test accuracy": []}

    losses, bar = [], _bar(epochs * batches, f"digits/{cell}", quiet)
    for epoch in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx))]
        epoch_loss = 0.0
        net.train()
        for b in range(batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            logits, _ = net(images[idx])
            loss = nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            epoch_loss += loss.item() * len(idx)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}", refresh=False)
        net.eval()
        with torch.no_grad():
            pred = net(x_test)[0].argmax(1)
        curve["train loss"].append(epoch_loss / len(train_idx))
        curve["test accuracy"].append((pred == y_test).float().mean().item())
    bar.close()
    correct = int((pred == y_test).sum())
    accuracy = correct / len(y_test)

    plt = _plt()
    fig = plt.figure(figsize=(11, 4))
    ax = fig.add_subplot(1, 3, 1)
    ax.plot(range(1, epochs + 1), curve["train loss"], "o-")
    ax.set(title="train loss", xlabel="epoch", yscale="log")
    ax = fig.add_subplot(1, 3, 2)
    ax.plot(range(1, epochs + 1), curve["test accuracy"], "o-", color="g")
    ax.set(title=f"test accuracy (final {accuracy:.3f})", xlabel="epoch", ylim=(0, 1))
    for i in range(12):
        ax = fig.add_subplot(4, 9, 9 * (i // 3) + 7 + i % 3)
        ax.imshow(x_test[i].numpy(), cmap="gray_r")
        ok = pred[i] == y_test[i]
        ax.set_title(f"{int(pred[i])}" + ("" if ok else f" ({int(y_test[i])})"), color="k" if ok else "r",
                     fontsize=9)
        ax.axis("off")
    fig.suptitle(f"digits: {cell} reading 8x8 images one row per step\n"
                 "right: held-out digits with the predicted label (red: wrong, true label in brackets)",
                 fontsize=10)
    plot = _save_fig(fig, out, "digits.png")
    result = f"digits: {cell} test accuracy {accuracy:.4f} ({correct}/{len(y_test)} held-out images) " \
             f"after {epochs} epochs"
    return dict(task="digits", result=result, accuracy=accuracy, losses=losses, curve=curve, plot=plot, model=net)


# ----------------------------------------------------------------------------- the adding problem


def adding_batch(batch: int, seq_len: int, generator: torch.Generator):
    """(value, marker) pairs: one marker in the first half, one in the second; target = sum of marked values."""
    values = torch.rand(batch, seq_len, generator=generator)
    first = torch.randint(0, seq_len // 2, (batch,), generator=generator)
    second = torch.randint(seq_len // 2, seq_len, (batch,), generator=generator)
    markers = torch.zeros(batch, seq_len)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=2)  # (N, L, 2)
    y = (values * markers).sum(1, keepdim=True)  # (N, 1)
    return x, y


def adding(cells: Sequence[str] = ("rnn", "gru", "lstm"), backend="auto", steps=1000, seq_len=100, hidden_size=32,
           seed=0, out="rnnkit-out", quiet=False, batch_size=64, lr=0.01) -> Dict:
    # predicting the mean (1.0) scores the variance of a sum of two U(0, 1): 2/12
    baseline = 1.0 / 6.0
    test_x, test_y = adding_batch(1000, seq_len, torch.Generator().manual_seed(seed + 1))
    nets, curves, mse = {}, {}, {}
    for cell in cells:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)  # every cell sees the same batches
        net = make_net(cell, 2, hidden_size, 1, backend, every_step=False)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        losses, bar = [], _bar(steps, f"adding/{cell}", quiet)
        for step in range(steps):
            x, y = adding_batch(batch_size, seq_len, gen)
            loss = nn.functional.mse_loss(net(x)[0], y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", refresh=False)
        bar.close()
        with torch.no_grad():
            mse[cell] = nn.functional.mse_loss(net(test_x)[0], test_y).item()
        nets[cell], curves[cell] = net, losses

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    window = max(1, steps // 50)
    for cell, losses in curves.items():
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1) if len(losses) >= window else torch.tensor(losses)
        ax.plot(range(window, window + len(smooth)), smooth.numpy(), label=f"{cell} (test MSE {mse[cell]:.4f})")
    ax.axhline(baseline, color="k", ls=":", label="predict the mean (1/6)")
    ax.set(title=f"adding problem, length {seq_len}", xlabel="training step", ylabel="MSE", yscale="log")
    ax.legend()
    plot = _save_fig(fig, out, "adding.png")
    best = min(mse, key=mse.get)
    scores = ", ".join(f"{cell} {mse[cell]:.4f}" for cell in cells)
    result = f"adding (length {seq_len}): test MSE {scores} (predicting the mean scores {baseline:.4f}); " \
             f"best: {best}"
    return dict(task="adding", result=result, mse=mse, losses=curves, plot=plot, model=nn.ModuleDict(nets))


def _save_fig(fig, out: str, name: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def run(task: str = "digits", cells: Optional[Sequence[str]] = None, backend: str = "auto", seed: int = 0,
        out: str = "rnnkit-out", save: Optional[str] = None, steps: Optional[int] = None,
        epochs: Optional[int] = None, seq_len: Optional[int] = None, hidden_size: Optional[int] = None,
        threads: int = 1, quiet: bool = False) -> Dict:
    """Run one demo task and return its results (``"result"`` is the summary line).

    ``threads`` defaults to 1: these models are small (batch <= 64, hidden <= 64),
    where intra-op threads do not pay and, on a busy machine, cost several times over."""
    try:  # every argument is checked (and each model built once) before any training
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        cells = list(cells or DEFAULT_CELLS[task])
        if task != "adding" and len(cells) != 1:
            raise ValueError(f"the {task} task trains one cell, got {len(cells)}: {cells}")
        extra = {k: v for k, v in dict(steps=steps, epochs=epochs, seq_len=seq_len, hidden_size=hidden_size).items()
                 if v is not None}
        allowed = {"sine": {"steps", "hidden_size"}, "digits": {"epochs", "hidden_size"},
                   "adding": {"steps", "seq_len", "hidden_size"}}[task]
        for key, value in extra.items():
            flag = "--" + key.replace("_", "-")
            if key not in allowed:
                raise ValueError(f"{flag} does not apply to the {task} task (it takes "
                                 f"{', '.join('--' + a.replace('_', '-') for a in sorted(allowed))})")
            if value < (2 if key == "seq_len" else 1):
                raise ValueError(f"{flag} must be at least {2 if key == 'seq_len' else 1}, got {value}")
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        for cell in cells:
            make_net(cell, 2, 4, 1, backend, every_step=False)
    except (ValueError, TypeError) as err:
        raise DemoArgumentError(str(err)) from err
    if backend in ("auto", "fused"):
        # build (or load) the fused kernels now, with their own message, so that a first-use compile is
        # neither counted as training time nor shown as a progress bar's stalled first step; the task's
        # imports run meanwhile
        _load_fused_meanwhile(task)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        if task == "sine":
            res = sine(cells[0], backend, seed=seed, out=out, quiet=quiet, **extra)
        elif task == "digits":
            res = digits(cells[0], backend, seed=seed, out=out, quiet=quiet, **extra)
        else:
            res = adding(cells, backend, seed=seed, out=out, quiet=quiet, **extra)
    finally:
        torch.set_num_threads(before)
    res["seconds"] = time.perf_counter() - start
    if save:
        os.makedirs(os.path.dirname(os.path.abspath(save)), exist_ok=True)
        torch.save(res["model"].state_dict(), save)
        res["saved"] = save
    return res
