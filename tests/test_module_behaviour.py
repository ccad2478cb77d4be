"""What users do with modules besides calling them: copy, save, convert, compile."""

from __future__ import annotations

import copy
import io

import torch

import rnnkit


def test_deepcopy_and_whole_module_save():
    lstm = rnnkit.LSTM(3, 4, 2, bidirectional=True, proj_size=2)
    x = torch.randn(5, 2, 3)
    assert torch.equal(copy.deepcopy(lstm)(x)[0], lstm(x)[0])
    buf = io.BytesIO()
    torch.save(lstm, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x)[0], lstm(x)[0])


def test_dtype_conversion_follows_the_module():
    gru = rnnkit.GRU(3, 4).double()
    out, h = gru(torch.randn(5, 2, 3, dtype=torch.float64))
    assert out.dtype == h.dtype == torch.float64


def test_torch_compile_traces():
    gru = rnnkit.GRU(3, 4, backend="reference")
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(gru, backend="eager")
    torch.testing.assert_close(compiled(x)[0], gru(x)[0])
