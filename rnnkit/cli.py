"""The rnnkit command line (a first version: `rnnkit demo` walks through the classic shapes)."""

from __future__ import annotations

import argparse
import sys

import torch

import rnnkit


def _walkthrough() -> None:
    torch.manual_seed(0)
    print(f"rnnkit {rnnkit.__version__} (torch {torch.__version__}): the classic shapes, computed live")
    rnn = rnnkit.RNN(5, 10, 2)
    out, h_n = rnn(torch.randn(6, 3, 5))
    print(f"RNN(5, 10, 2) on (6, 3, 5): out {tuple(out.shape)}, h_n {tuple(h_n.shape)}, "
          f"out[-1] == h_n[-1]: {torch.equal(out[-1], h_n[-1])}  [backend: {rnn.last_backend}]")
    lstm = rnnkit.LSTM(50, 100, num_layers=2)
    out, (h, c) = lstm(torch.randn(10, 3, 50))
    print(f"LSTM(50, 100, num_layers=2) on (10, 3, 50): out {tuple(out.shape)}, h {tuple(h.shape)}, "
          f"c {tuple(c.shape)}, out[-1] == h[-1]: {torch.equal(out[-1], h[-1])}")
    gru = rnnkit.GRU(10, 20, 2)
    out, h = gru(torch.randn(3, 32, 10))
    print(f"GRU(10, 20, 2) on (3, 32, 10): out {tuple(out.shape)}, h {tuple(h.shape)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rnnkit", description="rnnkit: recurrent neural networks for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="walk through the classic shapes")
    args = parser.parse_args(argv)
    if args.command == "demo":
        _walkthrough()
    return 0


if __name__ == "__main__":
    sys.exit(main())
