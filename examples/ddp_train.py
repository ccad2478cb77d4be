"""Data-parallel training of a model with rnnkit layers over several CPU processes
(DistributedDataParallel, gloo).

    torchrun --nproc-per-node 2 examples/ddp_train.py [--steps 100] [--save DIR]

The model stacks a standard layer (``rnnkit.LSTM``) and a zoo layer (``rnnkit.LayerNormGRU``)
under a linear head. Each process trains on its own shard of every global batch; DDP averages
the gradients across processes, so every process holds the same parameters after each step,
equal to training one process on the whole batch (tests/test_deploy.py checks both).
torchrun sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; on one machine
add ``--master-addr 127.0.0.1`` to stay on the loopback interface.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import rnnkit


class Tagger(nn.Module):
    """Classifies a sequence ``(N, L, input_size)`` into ``classes`` from the last state."""

    def __init__(self, input_size=8, hidden_size=32, classes=4):
        super().__init__()
        self.lstm = rnnkit.LSTM(input_size, hidden_size, batch_first=True)          # a standard layer
        self.gru = rnnkit.LayerNormGRU(hidden_size, hidden_size, batch_first=True)  # a zoo layer
        self.head = nn.Linear(hidden_size, classes)

    def forward(self, x):
        y, _ = self.lstm(x)
        _, h = self.gru(y)
        return self.head(h[-1])


def make_batch(step, batch, length=12, input_size=8, seed=0):
    """The global batch of ``step``: the same on every process (each takes its own shard)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch, length, input_size, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long() + 2 * (x[:, -1, 1] > 0).long()  # 4 classes a recurrent net can learn
    return x, y


def train(model, steps, batch, rank=0, world_size=1, lr=0.1, seed=0):
    """SGD for ``steps`` steps on shards of ``batch`` sequences (the global batch is
    ``batch * world_size``); returns this process's losses."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = make_batch(step, batch * world_size, seed=seed)
        x, y = x[rank * batch:(rank + 1) * batch], y[rank * batch:(rank + 1) * batch]  # this process's shard
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # DDP all-reduces (averages) the gradients here
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16, help="sequences per process and step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="folder to write each rank's state_dict (rank<k>.pt) into")
    args = p.parse_args(argv)

    dist.init_process_group("gloo")  # CPU; rank, world size and rendezvous come from torchrun's environment
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(Tagger())
    losses = train(model, args.steps, args.batch, rank, world_size, seed=args.seed)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        torch.save(model.module.state_dict(), os.path.join(args.save, f"rank{rank}.pt"))
    if rank == 0:
        k = max(1, min(10, len(losses) // 2))
        print(f"{world_size} processes, {args.steps} steps: loss {sum(losses[:k]) / k:.3f} (first {k}) -> "
              f"{sum(losses[-k:]) / k:.3f} (last {k})")
    dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
