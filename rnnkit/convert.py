"""Conversions between rnnkit's standard layers and their torch.nn namesakes."""

from __future__ import annotations

import copy

from torch import nn

_TORCH_NN = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU, "RNNCell": nn.RNNCell, "LSTMCell": nn.LSTMCell,
             "GRUCell": nn.GRUCell}


def _torch_twin(module: nn.Module) -> nn.Module:
    from .cells import CellBase
    name = next(n for n in _TORCH_NN if isinstance(module, _TORCH_NN[n]))
    extra = module._regularizers_active() if hasattr(module, "_regularizers_active") else None
    if extra or getattr(module, "weight_drop", 0):
        raise ValueError(f"{module._describe()}: torch.nn.{name} has no {extra or 'weight_drop'}; it cannot be "
                         "converted to torch.nn")
    nonlinearity = getattr(module, "nonlinearity", "tanh")
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"{module._describe()}: torch.nn.{name} has no nonlinearity={nonlinearity!r}")
    ref = next(module.parameters())
    factory = {"device": ref.device, "dtype": ref.dtype, "bias": module.bias}
    if isinstance(module, CellBase):
        kwargs = {"nonlinearity": nonlinearity} if name == "RNNCell" else {}
        twin = _TORCH_NN[name](module.input_size, module.hidden_size, **kwargs, **factory)
    else:
        kwargs = {"nonlinearity": nonlinearity} if name == "RNN" else {}
        if name == "LSTM":
            kwargs["proj_size"] = module.proj_size
        twin = _TORCH_NN[name](module.input_size, module.hidden_size, num_layers=module.num_layers,
                               batch_first=module.batch_first, dropout=module.dropout,
                               bidirectional=module.bidirectional, **kwargs, **factory)
    twin.load_state_dict(module.state_dict())
    twin.train(module.training)
    return twin


def to_torch_nn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every rnnkit ``RNN``, ``LSTM``, ``GRU``, ``RNNCell``,
    ``LSTMCell`` and ``GRUCell`` is replaced by its torch.nn namesake holding the same
    weights (a ``ValueError`` names a layer that uses what torch.nn lacks: zoneout,
    recurrent dropout, weight-drop, another nonlinearity). ``model`` itself may be one.

    For tools that match torch.nn's classes *exactly*, such as dynamic quantization::

        qmodel = torch.ao.quantization.quantize_dynamic(rnnkit.to_torch_nn(model), {nn.LSTM, nn.Linear})
    """
    from .cells import CellBase
    from .layers import RecurrentBase

    def standard(m):
        return isinstance(m, (RecurrentBase, CellBase)) and any(isinstance(m, c) for c in _TORCH_NN.values())

    if standard(model):
        return _torch_twin(model)
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if standard(child):
                setattr(parent, child_name, _torch_twin(child))
    return model


__all__ = ["to_torch_nn"]
