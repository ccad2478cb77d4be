"""Classify variable-length sequences from a padded batch: no packing code.

Each sequence is a random walk; the label says whether it ends above zero.
The LSTM gets `lengths=`, so h_n holds each sequence's state after its own last
step and the head reads it directly.

    python examples/lengths_classifier.py [--steps 150]
"""

import argparse

import torch

import rnnkit


def batch(n, max_len, g):
    lengths = torch.randint(5, max_len + 1, (n,), generator=g)
    seqs = [torch.randn(int(k), 1, generator=g) for k in lengths]
    labels = torch.tensor([float(s.sum() > 0) for s in seqs])
    return rnnkit.pad_sequence(seqs, batch_first=True), lengths, labels  # (N, L, 1), (N,), (N,)


def main(steps=150, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    lstm = rnnkit.LSTM(1, 32, batch_first=True)
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(steps):
        x, lengths, y = batch(64, 30, g)
        _, (h_n, _) = lstm(x, lengths=lengths)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(h_n[-1]).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, lengths, y = batch(1000, 30, g)
    with torch.no_grad():
        _, (h_n, _) = lstm(x, lengths=lengths)
        acc = ((head(h_n[-1]).squeeze(-1) > 0).float() == y).float().mean().item()
    print(f"test accuracy {acc:.3f}")
    return acc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    main(p.parse_args().steps)
