"""Padding utilities: re-exports, lengths_to_mask, and no mutation of inputs."""

from __future__ import annotations

import pytest
import torch

import rnnkit


def test_reexports_are_torchs():
    assert rnnkit.pad_sequence is torch.nn.utils.rnn.pad_sequence
    assert rnnkit.pack_padded_sequence is torch.nn.utils.rnn.pack_padded_sequence
    assert rnnkit.pad_packed_sequence is torch.nn.utils.rnn.pad_packed_sequence


def test_lengths_to_mask_against_a_loop():
    lengths = torch.tensor([2, 0, 3])
    mask = rnnkit.lengths_to_mask(lengths, batch_first=True)
    expected = torch.tensor([[t < n for t in range(3)] for n in lengths.tolist()])
    assert torch.equal(mask, expected)
    assert torch.equal(rnnkit.lengths_to_mask(lengths), expected.t())
    assert rnnkit.lengths_to_mask([1, 2], max_len=5).shape == (5, 2)


@pytest.mark.parametrize("args,exc,pattern", [
    (([2.0, 1.0],), TypeError, r"lengths_to_mask: lengths must hold integers, got dtype torch.float32"),
    (([2, -1],), ValueError, r"lengths_to_mask: lengths must be >= 0, got -1"),
    (([[2, 1]],), ValueError, r"lengths_to_mask: lengths must be 1-D \(N,\), got shape \(1, 2\)"),
    (([2, 5], 3), ValueError, r"lengths_to_mask: max_len=3 is shorter than the longest length 5"),
])
def test_lengths_to_mask_errors(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        rnnkit.lengths_to_mask(*args)


@pytest.mark.parametrize("batch_first", [False, True])
def test_unpad_sequence_does_not_mutate(batch_first):
    seqs = [torch.randn(n, 2) for n in (3, 1, 4)]
    padded = rnnkit.pad_sequence(seqs, batch_first=batch_first)
    before_shape, before_stride, before = padded.shape, padded.stride(), padded.clone()
    out = rnnkit.unpad_sequence(padded, torch.tensor([3, 1, 4]), batch_first=batch_first)
    assert padded.shape == before_shape and padded.stride() == before_stride and torch.equal(padded, before)
    for a, b in zip(out, seqs):
        assert torch.equal(a, b)


def test_unpad_sequence_errors():
    with pytest.raises(ValueError, match=r"unpad_sequence: lengths has 2 entries but the batch has N=3"):
        rnnkit.unpad_sequence(torch.zeros(4, 3, 2), [1, 2])
    with pytest.raises(ValueError, match=r"unpad_sequence: lengths has 5 but L=4"):
        rnnkit.unpad_sequence(torch.zeros(4, 3, 2), [1, 2, 5])
    with pytest.raises(ValueError, match=r"unpad_sequence: padded_sequences must be at least 2-D"):
        rnnkit.unpad_sequence(torch.zeros(4), [1])
