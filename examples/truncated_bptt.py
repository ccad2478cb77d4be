"""Truncated backpropagation through time on a long stream, with rnnkit.Stream.

A GRU reads a long noisy sine stream in chunks and learns to predict the next
value. The state is carried from chunk to chunk and detached between them, so
gradients flow through at most one chunk; rows whose "episode" ends are reset.

    python examples/truncated_bptt.py [--steps 200]
"""

import argparse

import torch

import rnnkit


def make_stream(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length).float()
    freq = 0.05 + 0.1 * torch.rand(batch, 1, generator=g)
    x = torch.sin(freq * t) + 0.05 * torch.randn(batch, length, generator=g)
    return x.unsqueeze(-1)  # (N, L, 1)


def main(steps=200, chunk=25, seed=0):
    torch.manual_seed(seed)
    gru = rnnkit.GRU(1, 32, batch_first=True)
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.Adam([*gru.parameters(), *head.parameters()], lr=1e-2)
    data = make_stream(batch=8, length=steps * chunk + 1, seed=seed)
    stream = rnnkit.Stream(gru)
    losses = []
    for i in range(steps):
        x = data[:, i * chunk:(i + 1) * chunk]               # (N, chunk, 1)
        y = data[:, i * chunk + 1:(i + 1) * chunk + 1]       # next values
        loss = torch.nn.functional.mse_loss(head(stream(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stream.detach()                                      # truncate: the graph stops here
        if i % 50 == 49:                                     # episode boundary in rows 0 and 1
            stream.reset(torch.tensor([True, True] + [False] * 6))
        losses.append(loss.item())
    print(f"first-10 mean loss {sum(losses[:10]) / 10:.4f} -> last-10 mean loss {sum(losses[-10:]) / 10:.4f}")
    return losses


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    main(p.parse_args().steps)
