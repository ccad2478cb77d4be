"""Every error path: a clear ValueError/TypeError naming the argument, what was
received, how it was read, and what was expected."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit

# ----------------------------------------------------------------------------- constructor


@pytest.mark.parametrize("cls", [rnnkit.RNN, rnnkit.LSTM, rnnkit.GRU])
@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(hidden_size=0), ValueError, r"hidden_size must be a positive int, got 0"),
    (dict(hidden_size=2.5), TypeError, r"hidden_size must be a positive int, got 2.5 of type float"),
    (dict(input_size=-1), ValueError, r"input_size must be a positive int, got -1"),
    (dict(num_layers=0), ValueError, r"num_layers must be a positive int, got 0"),
    (dict(num_layers=True), TypeError, r"num_layers must be a positive int, got True of type bool"),
    (dict(dropout=1.5), ValueError, r"dropout must be a number in \[0, 1\].*got 1.5"),
    (dict(dropout="0.1"), ValueError, r"dropout must be a number in \[0, 1\].*got '0.1'"),
    (dict(bias=1), TypeError, r"bias must be a bool, got 1 of type int"),
    (dict(batch_first="yes"), TypeError, r"batch_first must be a bool"),
    (dict(bidirectional=None), TypeError, r"bidirectional must be a bool"),
    (dict(backend="cudnn"), ValueError, r"backend must be one of \['auto', 'reference', 'torch', 'fused'\], got 'cudnn'"),
])
def test_constructor_rejects(cls, kwargs, exc, pattern):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        cls(**args)


def test_proj_size_errors():
    with pytest.raises(ValueError, match=r"LSTM: proj_size must be >= 0.*got -1"):
        rnnkit.LSTM(3, 4, proj_size=-1)
    with pytest.raises(ValueError, match=r"proj_size must be smaller than hidden_size, got proj_size=4 and hidden_size=4"):
        rnnkit.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match=r"GRU: proj_size is only supported by LSTM \(got proj_size=2\)"):
        rnnkit.GRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match=r"RNN: proj_size is only supported by LSTM"):
        rnnkit.RNN(3, 4, proj_size=2)
    with pytest.raises(TypeError, match=r"proj_size must be an int, got 1.5"):
        rnnkit.LSTM(3, 4, proj_size=1.5)


def test_unknown_nonlinearity():
    with pytest.raises(ValueError, match=r"RNN: nonlinearity must be one of \[.*'relu'.*'tanh'.*\] or a callable, got 'swish2'"):
        rnnkit.RNN(3, 4, nonlinearity="swish2")
    with pytest.raises(ValueError, match=r"RNNCell: nonlinearity must be one of"):
        rnnkit.RNNCell(3, 4, nonlinearity="nope")


def test_backend_that_cannot_run_the_configuration():
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this configuration: PyTorch has no fused op "
                                         r"for the 'rnn_gelu' cell\. Use backend='auto'"):
        rnnkit.RNN(3, 4, nonlinearity="gelu", backend="torch")
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this cell"):
        rnnkit.RNNCell(3, 4, nonlinearity=torch.sin, backend="torch")
    with pytest.raises(ValueError, match=r"RNNCell: backend must be one of \['auto', 'reference', 'torch', 'fused'\]"):
        rnnkit.RNNCell(3, 4, backend="cuda")


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match=r"non-zero dropout expects num_layers greater than 1, but got dropout=0.5 "
                                         r"and num_layers=1"):
        rnnkit.LSTM(3, 4, dropout=0.5)


# ----------------------------------------------------------------------------- input


def test_input_not_a_tensor():
    with pytest.raises(TypeError, match=r"LSTM\(input_size=3, hidden_size=4\): input must be a Tensor or a "
                                        r"PackedSequence, got list"):
        rnnkit.LSTM(3, 4)([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4, 3)])
def test_input_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"input must be 3-D \(L, N, H_in\) \(batched, batch_first=False\) or 2-D "
                                         r"\(L, H_in\) \(unbatched\), got \d-D input of shape"):
        rnnkit.LSTM(3, 4)(torch.randn(shape))


def test_input_wrong_rank_batch_first_names_the_layout():
    with pytest.raises(ValueError, match=r"3-D \(N, L, H_in\) \(batched, batch_first=True\)"):
        rnnkit.GRU(3, 4, batch_first=True)(torch.randn(2, 3, 4, 3))


def test_wrong_feature_size_says_how_the_input_was_read():
    with pytest.raises(ValueError) as info:
        rnnkit.LSTM(50, 100)(torch.randn(10, 3, 40))
    msg = str(info.value)
    assert "input of shape (10, 3, 40) was read as (L=10, N=3, H_in=40) [batch_first=False]" in msg
    assert "its feature axis (the last, H_in=40) must equal input_size=50" in msg
    assert "Fix: give the input 50 features on its last axis, or construct the layer with input_size=40" in msg


def test_wrong_feature_size_batch_first_reading():
    with pytest.raises(ValueError, match=r"read as \(N=10, L=3, H_in=40\) \[batch_first=True\]"):
        rnnkit.GRU(50, 8, batch_first=True)(torch.randn(10, 3, 40))


def test_wrong_feature_size_suggests_moving_the_feature_axis():
    # channels-first data (N, C, L): the feature axis is in the middle
    with pytest.raises(ValueError, match=r"Fix: axis 1 has size 28 = input_size; if that is your feature axis, move "
                                         r"it last, e.g. x.transpose\(1, 2\)"):
        rnnkit.LSTM(28, 64, batch_first=True)(torch.randn(8, 28, 20))


def test_unbatched_wrong_features():
    with pytest.raises(ValueError, match=r"read as \(L=5, H_in=2\) \[unbatched\]"):
        rnnkit.RNN(3, 4)(torch.randn(5, 2))


def test_empty_sequence_axis():
    with pytest.raises(ValueError, match=r"the sequence axis L is empty"):
        rnnkit.LSTM(3, 4)(torch.randn(0, 2, 3))


def test_dtype_mismatch_input():
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 but the parameters are torch.float32\. Fix: "
                                        r"convert the input with .to\(torch.float32\) or the module with "
                                        r".to\(torch.float64\)"):
        rnnkit.LSTM(3, 4)(torch.randn(5, 2, 3, dtype=torch.float64))


def test_device_mismatch_input():
    with pytest.raises(ValueError, match=r"input is on device meta but the parameters are on cpu"):
        rnnkit.GRU(3, 4)(torch.empty(5, 2, 3, device="meta"))


# ----------------------------------------------------------------------------- states


def test_hx_wrong_shape_says_expected_and_meaning():
    with pytest.raises(ValueError) as info:
        rnnkit.GRU(3, 4, num_layers=2)(torch.randn(5, 2, 3), torch.randn(1, 2, 4))
    msg = str(info.value)
    assert "h_0 has shape (1, 2, 4) but expected (2, 2, 4) = (D*num_layers=1*2, N=2, H_out=4)" in msg
    assert "was read as (L=5, N=2, H_in=3) [batch_first=False]" in msg


def test_hx_batch_matches_other_axis_suggests_batch_first():
    with pytest.raises(ValueError, match=r"Fix: h_0's batch size 32 matches input axis 0; if your input is laid out "
                                         r"as \(N, L, \.\.\.\), construct the layer with batch_first=True"):
        rnnkit.LSTM(28, 64)(torch.randn(32, 10, 28), (torch.zeros(1, 32, 64), torch.zeros(1, 32, 64)))


def test_lstm_c0_wrong_shape_with_projection():
    lstm = rnnkit.LSTM(3, 6, proj_size=2)
    with pytest.raises(ValueError, match=r"c_0 has shape \(1, 2, 2\) but expected \(1, 2, 6\) = \(D\*num_layers=1\*1, "
                                         r"N=2, H=6\)"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)))


def test_lstm_hx_must_be_a_tuple():
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\), got Tensor"):
        rnnkit.LSTM(3, 4)(torch.randn(5, 2, 3), torch.zeros(1, 2, 4))


def test_gru_hx_must_be_a_tensor():
    with pytest.raises(TypeError, match=r"hx must be a single Tensor h_0 for this layer, got a tuple"):
        rnnkit.GRU(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),))


def test_unbatched_input_with_batched_hx():
    with pytest.raises(ValueError, match=r"Fix: the input is unbatched \(no N axis\), so the state must be unbatched"):
        rnnkit.RNN(3, 4)(torch.randn(5, 3), torch.zeros(1, 1, 4))


def test_hx_dtype_mismatch():
    with pytest.raises(TypeError, match=r"h_0 has dtype torch.float64 but the parameters are torch.float32"):
        rnnkit.RNN(3, 4)(torch.randn(5, 2, 3), torch.zeros(1, 2, 4, dtype=torch.float64))


# ----------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("lengths,exc,pattern", [
    ([3, 2], ValueError, r"lengths has 2 entries but the batch has N=3"),
    ([3, 2, 6], ValueError, r"lengths has 6 but the sequence axis holds only L=5 steps"),
    ([3, -1, 2], ValueError, r"lengths must be >= 0, got -1"),
    (torch.tensor([3.0, 2.0, 1.0]), TypeError, r"lengths must hold integers, got a tensor of dtype torch.float32"),
    (torch.tensor([[3, 2, 1]]), ValueError, r"lengths must be 1-D \(N,\), got shape \(1, 3\)"),
    ([3, 2.5, 1], TypeError, r"lengths must hold integers, got 2.5 of type float"),
    ("3,2,1", TypeError, r"lengths must be a 1-D integer tensor or a list of ints, got str"),
])
def test_bad_lengths(lengths, exc, pattern):
    with pytest.raises(exc, match=pattern):
        rnnkit.GRU(3, 4)(torch.randn(5, 3, 3), lengths=lengths)


def test_lengths_with_packed_sequence():
    packed = pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match=r"lengths cannot be given with a PackedSequence input"):
        rnnkit.LSTM(3, 4)(packed, lengths=[5, 3])


# ----------------------------------------------------------------------------- cells


def test_cell_errors():
    cell = rnnkit.LSTMCell(3, 4)
    with pytest.raises(ValueError, match=r"input must be 2-D \(N, H_in\) or 1-D \(H_in,\) unbatched, got 3-D"):
        cell(torch.randn(2, 2, 3))
    with pytest.raises(ValueError, match=r"input of shape \(2, 5\) was read as \(N=2, H_in=5\); its feature axis "
                                         r"\(the last\) must equal input_size=3"):
        cell(torch.randn(2, 5))
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h, c\), got Tensor"):
        cell(torch.randn(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"c has shape \(3, 4\) but expected \(2, 4\) = \(N=2, H=4\)"):
        cell(torch.randn(2, 3), (torch.zeros(2, 4), torch.zeros(3, 4)))
    with pytest.raises(TypeError, match=r"GRUCell\(input_size=3, hidden_size=4\): input has dtype torch.float64"):
        rnnkit.GRUCell(3, 4)(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"input must be a Tensor, got list"):
        rnnkit.RNNCell(3, 4)([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int, got 0"):
        rnnkit.GRUCell(3, 0)
