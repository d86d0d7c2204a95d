"""torch_ellm: elastic memory for LLM inference in PyTorch (eLLM, arXiv 2506.15155).

Virtual tensors whose address never moves, one pool for weights, activations and KV cache,
and host-memory borrowing at the same address. See README.md.
"""
from . import _C
from .errors import BackendError, OutOfMemoryError, ReleasedError
from .pool import TAGS, Pool, VirtualTensor
from .sizes import format_bytes, parse_bytes

_C._set_error_classes(OutOfMemoryError, ReleasedError, BackendError)

__all__ = ["Pool", "VirtualTensor", "TAGS", "OutOfMemoryError", "ReleasedError", "BackendError",
           "parse_bytes", "format_bytes"]
