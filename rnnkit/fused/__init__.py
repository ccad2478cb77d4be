"""rnnkit's fused CPU backend (``backend="fused"``).

Importing this package registers the backend; the C++ extension is compiled on
first use (or ahead of time with ``python -m rnnkit.fused build``) and cached.
See docs/fused.md.
"""

from ..backends import register_backend
from . import _ops
from ._build import DISABLE_ENV, info, load
from .backend import KERNELS, FusedBackend, fused_scan

_ops.register()  # the ops' schemas, fake and autograd implementations; the C++ kernels load on first use
BACKEND = register_backend(FusedBackend())

__all__ = ["BACKEND", "DISABLE_ENV", "FusedBackend", "KERNELS", "fused_scan", "info", "load"]
