"""Zoneout and recurrent dropout on the fused kernels: what they cost in training.

    PYTHONPATH=. python benchmarks/fused_regularizers.py [--layer lstm] [--size M] [--seq-len 100] [--repeats 9]

A layer's forward+backward (``out.sum().backward()``) at a bench size (``rnnkit.bench.SIZES``: M is
batch 16, input 64, hidden 128), float32, training mode, side by side and interleaved
(``rnnkit.bench.time_row``: each repeat times every contestant once, in a rotating order; min and
median over the repeats). ``--layer``: ``lstm``, ``gru``, ``peephole_lstm``, ``layernorm_lstm``,
``layernorm_gru``.

* ``fused``: the plain layer on the fused backend;
* ``fused+reg``: the same layer with ``zoneout=0.1, recurrent_dropout=0.25`` on the fused backend
  (the masks drawn by ``rnnkit.runner.bernoulli_mask``, the time loop in C++);
* ``reference+reg``: the regularized layer on the reference backend (what ``auto`` ran before);
* ``lstm``: the plain ``rnnkit.LSTM`` of the same size on the fused backend, the yardstick of "every
  variant nearly as fast as a plain LSTM" (only for another ``--layer``);
* ``masks``: drawing the zoneout masks alone, as ``rnnkit.runner.apply_regularizers`` draws them
  (one ``bernoulli_mask`` call of ``(T, N, H)`` per state), and ``bernoulli_``: the same elements
  drawn by torch's ``Tensor.bernoulli_`` (what ``bernoulli_mask`` used before; one random number
  per element where ``bernoulli_mask`` takes 32 bits of a 64-bit draw).

The target (issue 13, item 5): ``fused+reg`` at most 1.3x ``fused`` at size M (the LSTM).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import rnnkit  # noqa: E402
from rnnkit import bench, runner  # noqa: E402

REG = dict(zoneout=0.1, recurrent_dropout=0.25)


LAYERS = {"lstm": "LSTM", "gru": "GRU", "peephole_lstm": "PeepholeLSTM", "layernorm_lstm": "LayerNormLSTM",
          "layernorm_gru": "LayerNormGRU"}


def contestants(size: str, seq_len: int, reference: bool = True, layer: str = "lstm"):
    batch, h_in, hidden = bench.SIZES[size]
    torch.manual_seed(0)
    x = torch.randn(seq_len, batch, h_in, requires_grad=True)
    cls = getattr(rnnkit, LAYERS[layer])
    plain = cls(h_in, hidden, backend="fused")
    reg = cls(h_in, hidden, backend="fused", **REG)
    reg.load_state_dict(plain.state_dict())
    ref = cls(h_in, hidden, backend="reference", **REG)
    ref.load_state_dict(plain.state_dict())
    lstm = rnnkit.LSTM(h_in, hidden, backend="fused")

    def fwd_bwd(module):
        def call():
            module.zero_grad(set_to_none=True)
            out, _ = module(x)
            out.sum().backward()
        return call

    like = torch.empty(batch, hidden)

    def masks():
        runner.bernoulli_mask((seq_len, batch, hidden), 0.1, like, "zoneout_h")
        runner.bernoulli_mask((seq_len, batch, hidden), 0.1, like, "zoneout_c")

    def torch_bernoulli():
        torch.empty(seq_len, batch, hidden).bernoulli_(0.1)
        torch.empty(seq_len, batch, hidden).bernoulli_(0.1)

    fns = {"fused": fwd_bwd(plain), "fused+reg": fwd_bwd(reg)}
    if reference:
        fns["reference+reg"] = fwd_bwd(ref)
    if layer != "lstm":
        fns["lstm"] = fwd_bwd(lstm)
    fns.update({"masks": masks, "bernoulli_": torch_bernoulli})
    return fns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", default="lstm", choices=list(LAYERS))
    parser.add_argument("--size", default="M", choices=list(bench.SIZES))
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--target-s", type=float, default=0.2, help="seconds per contestant per repeat")
    parser.add_argument("--no-reference", action="store_true", help="leave out the (slow) reference backend")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fns = contestants(args.size, args.seq_len, reference=not args.no_reference, layer=args.layer)
    mins, medians = bench.time_row(fns, args.repeats, args.target_s)
    batch, h_in, hidden = bench.SIZES[args.size]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{LAYERS[args.layer]}({h_in}, {hidden}) batch {batch}, T={args.seq_len}, float32, training, fwd+bwd; "
          f"regularized: {REG}; {args.repeats} interleaved repeats")
    print(f"{'contestant':>14} {'min ms':>9} {'median ms':>10} {'min / fused':>12} {'median / fused':>15}")
    for name in fns:
        print(f"{name:>14} {mins[name] * 1e3:9.3f} {medians[name] * 1e3:10.3f} {mins[name] / mins['fused']:12.3f} "
              f"{medians[name] / medians['fused']:15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
