"""Whole-module pickling: what ``torch.save(module, f)`` writes, and safe loading.

A saved rnnkit module holds what a saved torch.nn layer holds: its class, its
tensors and plain Python values (ints, floats, bools, strings, tuples, lists,
dicts). Everything derived from those values is rebuilt on load, not pickled:

* the cell description (``cell_spec``, with its step functions and activation)
  comes back from the class's ``_make_spec()``, which ``__init__`` also uses;
* a nonlinearity given by name (any name in
  :data:`rnnkit.functional.ACTIVATIONS`) is stored as that name; a callable that
  *is* one of those functions (``torch.tanh``) is stored by its name too and comes
  back as that same function;
* backends are looked up by name (``module.backend``) when the module runs.

So ``torch.load(f)``, whose default is ``weights_only=True`` since torch 2.6,
loads a module once its class is allowed, exactly as for ``torch.nn.LSTM``::

    torch.serialization.add_safe_globals(rnnkit.safe_globals())
    model = torch.load(f)

Any other callable nonlinearity (your own function, an ``nn.Module``) is pickled
by reference, as Python pickles a function or a module, so a ``weights_only``
load needs it allowed as well: ``add_safe_globals([*rnnkit.safe_globals(),
my_activation])`` (torch's error names the missing global). A lambda or a local
function cannot be pickled at all, as anywhere in Python; pickling a module that
holds one raises a ``pickle.PicklingError`` that says so (``copy.deepcopy`` still
works).

A subclass of :class:`rnnkit.RecurrentBase` or ``rnnkit.cells.CellBase`` that
passes its own spec to ``__init__`` and does not override ``_make_spec()`` keeps
its spec in the pickle (by reference: loading with ``weights_only=True`` then
needs :class:`rnnkit.CellSpec` and its functions allowed).

Checkpoints written before this format pickled ``cell_spec`` itself; they load
with ``weights_only=False`` (their pickle names ``rnnkit.spec.CellSpec`` and the
step functions, which ``weights_only=True`` refuses) and the spec is rebuilt
anyway. Saving them again writes the safe format.
"""

from __future__ import annotations

import pickle
import types
from typing import Any, Dict, List

from torch import nn

from .backends import AUTO_CHOICE
from .functional import ACTIVATIONS

FORMAT_KEY = "_rnnkit_pickle_format"
"""Present in every state this module writes (the format's version, an int); a
state without it comes from an older release."""

FORMAT = 1

_BY_NAME_KEY = "_rnnkit_activations_by_name"
"""``{attribute: name}`` for attributes that held a function of ACTIVATIONS."""

_TRANSIENT = {"_dropped_weights": None, "_packed_order": None}
"""Attributes that only live during a forward: saved as their idle value."""


def module_state(module: nn.Module) -> Dict[str, Any]:
    """What pickling ``module`` stores: ``torch.nn.Module``'s state (a copy of
    ``__dict__``) without ``cell_spec`` when the class rebuilds it, with every
    ACTIVATIONS function replaced by its name."""
    state = nn.Module.__getstate__(module)
    state.update({k: v for k, v in _TRANSIENT.items() if k in state})
    state.pop(AUTO_CHOICE, None)  # auto's remembered choice (backends.AUTO_CHOICE): this process's, made again
    if "cell_spec" in state and _rebuilds(module, state["cell_spec"]):
        del state["cell_spec"]
    by_name = {}
    for key, value in state.items():
        name = _activation_name(value)
        if name is not None:
            by_name[key] = name
        elif _unreachable(value):
            state[key] = _NotPicklable(value, f"{type(module).__name__}: cannot pickle {key}={value!r}")
    for key, name in by_name.items():
        state[key] = name
    if by_name:
        state[_BY_NAME_KEY] = by_name
    state[FORMAT_KEY] = FORMAT
    return state


def restore_module(module: nn.Module, state: Dict[str, Any]) -> None:
    """Set ``module`` up from a pickled state: this module's format, or an older
    release's (which pickled ``cell_spec``; it is rebuilt from the attributes anyway)."""
    state = dict(state)
    fmt = state.pop(FORMAT_KEY, None)
    pickled_spec = state.pop("cell_spec", None)
    for key, name in state.pop(_BY_NAME_KEY, {}).items():
        state[key] = ACTIVATIONS[name]
    for key, value in state.items():
        if isinstance(value, _NotPicklable):  # copy.copy passes the state as it is
            state[key] = value.fn
    nn.Module.__setstate__(module, state)
    # this format pickles a spec only when the class cannot rebuild it (a custom
    # spec); an older release always did, and its spec is rebuilt when the class can
    spec = pickled_spec if fmt is not None and pickled_spec is not None else module._make_spec()
    if spec is None:
        spec = pickled_spec
    if spec is None:
        raise TypeError(f"{type(module).__name__}: cannot rebuild the cell spec on load: the checkpoint has no "
                        "cell_spec and the class defines no _make_spec()")
    module.cell_spec = spec


def _rebuilds(module: nn.Module, spec) -> bool:
    """Whether ``module._make_spec()`` gives back ``spec`` (then it need not be pickled)."""
    rebuilt = module._make_spec()
    if rebuilt is None:
        return False
    try:
        return rebuilt is spec or bool(rebuilt == spec)
    except Exception:  # an exotic ``extra`` that does not compare
        return False


_ACTIVATION_IDS = {id(fn): name for name, fn in ACTIVATIONS.items()}


def _activation_name(value) -> str | None:
    """The ACTIVATIONS name of ``value`` if it is one of those functions, else None."""
    if isinstance(value, str) or not callable(value):
        return None
    name = _ACTIVATION_IDS.get(id(value))
    return name if name is not None and ACTIVATIONS[name] is value else None


def _unreachable(value) -> bool:
    """A Python function that pickle cannot find by its module and name."""
    return isinstance(value, types.FunctionType) and ("<lambda>" in value.__qualname__
                                                       or "<locals>" in value.__qualname__)


class _NotPicklable:
    """Stands in the state for a lambda or local function: ``copy.deepcopy`` gets the
    function back, pickling raises an error that says why and what to pass instead."""

    __slots__ = ("fn", "what")

    def __init__(self, fn, what: str) -> None:
        self.fn = fn
        self.what = what

    def __deepcopy__(self, memo):
        return self.fn

    def __reduce_ex__(self, protocol):
        raise pickle.PicklingError(
            f"{self.what}: a callable nonlinearity is pickled by reference (its module and name), which a lambda "
            f"or a local function does not have. Pass a name from rnnkit.functional.ACTIVATIONS "
            f"({', '.join(sorted(ACTIVATIONS))}), a module-level function or an nn.Module; a torch.load with "
            "weights_only=True then needs your function or module class allowed too: "
            "torch.serialization.add_safe_globals([*rnnkit.safe_globals(), my_activation])")


def safe_globals() -> List[type]:
    """rnnkit's module classes, to allow for ``torch.load(f, weights_only=True)``.

    Every layer and cell class of rnnkit (the standard ones and the zoo; not the
    bases :class:`rnnkit.RecurrentBase` and ``CellBase``, nor your subclasses)::

        torch.serialization.add_safe_globals(rnnkit.safe_globals())
        model = torch.load(f)   # weights_only=True, torch's default since 2.6

    or ``with torch.serialization.safe_globals(rnnkit.safe_globals()): ...``. A saved
    rnnkit module names no other global than its class and what a saved
    ``torch.nn.LSTM`` names (tensors, ``OrderedDict``, ``set``), which torch allows
    by default; a nonlinearity given as your own callable or ``nn.Module`` is the
    exception and must be allowed too (see :mod:`rnnkit.saving`).
    """
    from .cells import CellBase
    from .layers import RecurrentBase

    found: Dict[str, type] = {}
    stack = [RecurrentBase, CellBase]
    while stack:  # every subclass, at any depth, that rnnkit defines and exports
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] == "rnnkit" and not cls.__name__.startswith("_") and \
                cls not in (RecurrentBase, CellBase):
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[key] for key in sorted(found)]
