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


def test_bfloat16_matches_a_float64_oracle_to_bf16_precision():
    from helpers import runnable_backends
    torch.manual_seed(0)
    for backend in runnable_backends():
        m = rnnkit.LSTM(3, 4, 2, bidirectional=True, dtype=torch.bfloat16, backend=backend)
        x = torch.randn(5, 2, 3, dtype=torch.bfloat16)
        out, _ = m(x, lengths=[5, 3])
        ref = torch.nn.LSTM(3, 4, 2, bidirectional=True, dtype=torch.float64)
        ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        packed = torch.nn.utils.rnn.pack_padded_sequence(x.double(), [5, 3])
        expected = torch.nn.utils.rnn.pad_packed_sequence(ref(packed)[0])[0]
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-2, msg=backend)
