"""rnnkit's Triton GPU backend (``backend="triton"``).

Importing this package registers the backend and nothing else: triton itself is imported when a
kernel first runs (``triton.jit`` reads ``TRITON_INTERPRET`` when the kernels are defined, so set it
before that to run them on CPU tensors through Triton's interpreter). See docs/gpu.md.
"""

from ..backends import register_backend
from ._common import interpreting, triton_missing
from .backend import KERNELS, TritonBackend, triton_scan

BACKEND = register_backend(TritonBackend())

__all__ = ["BACKEND", "KERNELS", "TritonBackend", "interpreting", "triton_missing", "triton_scan"]
