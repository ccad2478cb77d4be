"""The rnnkit command line: ``rnnkit demo | explain | bench | calibrate | info``.

``python -m rnnkit`` is the same program. Exit codes: 0 ok, 2 usage error
(a one-line message on stderr), 1 failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import textwrap
from typing import List, Optional

import torch

import rnnkit
from . import bench as _bench
from . import demo as _demo
from .fused import calibrate as _calibrate
from .backends import BACKEND_CHOICES
from .registry import LAYERS

EPILOG = """commands:
  demo       train a classic model on real data (digits, sine, adding) and plot how it did
  explain    the shapes a layer reads and returns, with what each axis means
  bench      time forward+backward of every backend side by side, print ratios
  calibrate  measure fused vs torch for every class auto chooses between, write this machine's cache
  info       versions, device, threads, which backends are ready, where auto's choices come from

examples:
  rnnkit demo                              # LSTM on handwritten digits, < 1 minute
  rnnkit demo --task adding                # RNN vs GRU vs LSTM on the adding problem
  rnnkit explain lstm --input-size 50 --hidden-size 100 --num-layers 2 --seq-len 10 --batch 3
  rnnkit bench --cell gru --size S
  rnnkit calibrate --family lstm --size L
  rnnkit info

Run `rnnkit COMMAND --help` for every option of a command."""


class UsageError(Exception):
    """A bad argument found after parsing: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _layer_name(value: str) -> str:
    return value.lower().replace("-", "_")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _non_negative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {n}")
    return n


def _shape(value: str):
    try:
        dims = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 10,3,50, got {value!r}") from None
    if not dims:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 10,3,50, got {value!r}")
    return dims


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rnnkit", description="rnnkit: recurrent neural networks for PyTorch.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"rnnkit {rnnkit.__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    layers = sorted(LAYERS)

    d = sub.add_parser(
        "demo", help="train a classic model on real data and plot how it did",
        description=textwrap.fill("Train one of the classic RNN tutorial models on real data, with a progress "
                                  "bar, a PNG plot and a one-line result. The default (digits) runs in well "
                                  "under a minute.", 90),
        epilog="tasks:\n"
               "  digits  LSTM(8, 64, batch_first) reads scikit-learn's 8x8 digits one row per step;\n"
               "          Linear(64, 10) on r_out[:, -1, :]; reports held-out test accuracy (default)\n"
               "  sine    RNN(1, 32, batch_first) reads sin(t) and predicts cos(t) with Linear(32, 1) at\n"
               "          every step, the hidden state carried (detached) between windows; reports test MSE\n"
               "  adding  the adding problem (Hochreiter & Schmidhuber 1997), length 100: RNN vs GRU vs\n"
               "          LSTM with hidden 32; reports each cell's test MSE (predicting the mean scores 1/6)\n\n"
               "examples:\n  rnnkit demo\n  rnnkit demo --task sine --cell gru --save sine.pt\n"
               "  rnnkit demo --task adding --cell gru --cell lstm --seq-len 200",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--task", choices=_demo.TASKS, default="digits", help="which model to train (default: digits)")
    d.add_argument("--cell", action="append", type=_layer_name, choices=layers, metavar="CELL",
                   help=f"recurrent layer to use, one of {', '.join(layers)} (default: lstm for digits, rnn for "
                        "sine; for adding give it several times to compare, default rnn, gru and lstm)")
    d.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="backend that runs the layer (default: auto, the fastest that can)")
    d.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same losses (default: 0)")
    d.add_argument("--out", default="rnnkit-out", metavar="DIR",
                   help="folder for the PNG plot (default: ./rnnkit-out)")
    d.add_argument("--save", metavar="PATH", help="save the trained model's state_dict here (torch.save)")
    d.add_argument("--steps", type=_positive, metavar="N",
                   help="training steps: windows for sine (default 300), batches per cell for adding (default 1000)")
    d.add_argument("--epochs", type=_positive, metavar="N", help="training epochs for digits (default 15)")
    d.add_argument("--seq-len", type=_positive, metavar="L", help="sequence length for adding (default 100)")
    d.add_argument("--hidden-size", type=_positive, metavar="H",
                   help="hidden size (default: 64 digits, 32 sine, 32 adding)")
    d.add_argument("--threads", type=_positive, default=1, metavar="N",
                   help="torch threads while training (default: 1; these models are too small to gain from more)")
    d.add_argument("--quiet", action="store_true", help="no progress bar (the result line is still printed)")

    e = sub.add_parser(
        "explain", help="show the shapes a layer reads and returns, and its parameters",
        description=textwrap.fill("Build a layer from the options and print how it reads an input of the given "
                                  "shape: the input's axes, the shapes of output, h_n (and c_n) with what each "
                                  "axis means, each parameter and the total count.", 90),
        epilog="examples:\n"
               "  rnnkit explain lstm --input-size 50 --hidden-size 100 --num-layers 2 --seq-len 10 --batch 3\n"
               "  rnnkit explain gru --input-size 8 --hidden-size 16 --batch-first --bidirectional\n"
               "  rnnkit explain lstm --input-size 50 --hidden-size 100 --shape 3,10,50   # why doesn't it fit?",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("layer", type=_layer_name, choices=layers, metavar="LAYER", help=f"one of {', '.join(layers)}")
    e.add_argument("--input-size", type=_positive, required=True, metavar="H_in", help="features per time step")
    e.add_argument("--hidden-size", type=_positive, required=True, metavar="H", help="features in the hidden state")
    e.add_argument("--num-layers", type=_positive, default=1, metavar="N", help="stacked layers (default: 1)")
    e.add_argument("--seq-len", type=_positive, default=10, metavar="L", help="sequence length L (default: 10)")
    e.add_argument("--batch", type=_positive, default=3, metavar="N", help="batch size N (default: 3)")
    e.add_argument("--batch-first", action="store_true", help="the layer takes (N, L, H_in) instead of (L, N, H_in)")
    e.add_argument("--bidirectional", action="store_true", help="run each layer in both directions")
    e.add_argument("--proj-size", type=_non_negative, default=0, metavar="P",
                   help="LSTM only: project h to P features (default: 0, no projection)")
    e.add_argument("--unbatched", action="store_true", help="explain an unbatched input (L, H_in), no batch axis")
    e.add_argument("--shape", type=_shape, metavar="D0,D1,...",
                   help="explain this exact input shape instead of the one built from --seq-len/--batch "
                        "(shows how it is read, or why it does not fit and the fix)")
    e.add_argument("--json", action="store_true", help="print the explanation as JSON instead of a table")

    b = sub.add_parser(
        "bench", help="time forward+backward of every backend side by side and print ratios",
        description=textwrap.fill(_bench.DESCRIPTION, 90), epilog=_bench.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _bench.add_arguments(b)

    c = sub.add_parser(
        "calibrate", help="measure fused vs torch for every class auto chooses between, write this machine's cache",
        description=textwrap.fill(_calibrate.DESCRIPTION, 90), epilog=_calibrate.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _calibrate.add_arguments(c)

    sub.add_parser("info", help="versions, device, threads, which backends are ready, where auto's choices come from",
                   description="Print rnnkit, torch and Python versions, the CPU (and CUDA device if any), "
                               "torch's thread count, the registered layers, each backend (ready or why not) "
                               "and where backend='auto' takes its choices from (measured on this machine, "
                               "with the cache file, or the shipped table).")
    return parser


# ----------------------------------------------------------------------------- commands


def cmd_demo(args) -> int:
    try:
        res = _demo.run(args.task, args.cell, backend=args.backend, seed=args.seed, out=args.out, save=args.save,
                        steps=args.steps, epochs=args.epochs, seq_len=args.seq_len, hidden_size=args.hidden_size,
                        threads=args.threads, quiet=args.quiet)
    except _demo.DemoArgumentError as err:
        raise UsageError(str(err)) from err
    print(f"plot: {res['plot']}")
    if res.get("saved"):
        print(f"state_dict: {res['saved']}")
    print(f"result: {res['result']} ({res['seconds']:.1f} s)")
    return 0


def cmd_explain(args) -> int:
    entry = LAYERS[args.layer]
    kwargs = {}
    if args.num_layers != 1:
        kwargs["num_layers"] = args.num_layers
    if args.batch_first:
        kwargs["batch_first"] = True
    if args.bidirectional:
        kwargs["bidirectional"] = True
    if args.proj_size:
        kwargs["proj_size"] = args.proj_size
    try:
        module = entry.make(args.input_size, args.hidden_size, **kwargs)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise UsageError(f"{args.layer} does not take {', '.join('--' + k.replace('_', '-') for k in kwargs)}: "
                             f"{err}") from err
        raise UsageError(str(err)) from err
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.shape is not None:
        shape = args.shape
    elif args.unbatched:
        shape = (args.seq_len, args.input_size) + tuple(entry.spatial or ())
    else:
        shape = entry.input_shape(args.seq_len, args.batch, args.input_size, args.batch_first)
    try:
        explain = importlib.import_module("rnnkit.explain").explain
    except ImportError:
        print("rnnkit explain: error: this rnnkit has no explainer (rnnkit.explain is missing)", file=sys.stderr)
        return 1
    expl = explain(module, tuple(shape))
    if args.json:
        print(json.dumps(expl.to_dict(), indent=2, default=str))
    else:
        print(expl)
    return 0 if expl.ok else 1


def cmd_bench(args) -> int:
    try:
        return _bench.run_from_args(args)
    except _bench.BenchArgumentError as err:
        raise UsageError(str(err)) from err


def cmd_calibrate(args) -> int:
    try:
        return _calibrate.run_from_args(args)
    except _calibrate.CalibrateArgumentError as err:
        raise UsageError(str(err)) from err


def info_lines() -> List[str]:
    lines = [f"rnnkit   {rnnkit.__version__}  ({os.path.dirname(rnnkit.__file__)})",
             f"torch    {torch.__version__}",
             f"python   {platform.python_version()} ({platform.python_implementation()}, {sys.platform})",
             f"cpu      {_bench.cpu_name()}, {os.cpu_count()} logical cores"
             + (f", {len(os.sched_getaffinity(0))} usable" if hasattr(os, "sched_getaffinity") else "")]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"cuda     {torch.version.cuda}: {', '.join(names)}")
    else:
        lines.append("cuda     not available")
    lines.append(f"threads  {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
                 f"  (oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'})")
    lines.append(f"layers   {', '.join(sorted(LAYERS))}")
    lines.append("backends")
    for name, status in rnnkit.describe_backends().items():
        lines.append(f"  {name:<10} {status}")
    fused = rnnkit.BACKENDS.get("fused")
    if fused is not None and hasattr(fused, "calibrator"):
        lines += _calibrate.describe(fused)
    return lines


def cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


COMMANDS = {"demo": cmd_demo, "explain": cmd_explain, "bench": cmd_bench, "calibrate": cmd_calibrate,
            "info": cmd_info}


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    prog = f"rnnkit {args.command}"
    try:
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"{prog}: error: {_one_line(err)} (see {prog} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rnnkit ... | head`: the reader left; not our failure
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as err:  # a failure, not a usage error
        print(f"{prog}: failed: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        if os.environ.get("RNNKIT_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
