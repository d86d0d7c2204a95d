"""torch_ellm: elastic memory for LLM inference in PyTorch (eLLM, arXiv 2506.15155).

Virtual tensors whose address never moves, one pool for weights, activations and KV cache,
and host-memory borrowing at the same address. See README.md.
"""
from . import _C
from .errors import BackendError, OutOfMemoryError, ReleasedError
from .allocator import (configure, empty_cache, enable, grant_peer_access, is_enabled, mem_pool, memory_stats,
                        memory_summary, pool, record_stream, reset_peak_memory_stats, tag)
from .pool import TAGS, HostBuffer, Pool, VirtualTensor
from .sizes import format_bytes, parse_bytes
from .timeline import plot_timeline

_C._set_error_classes(OutOfMemoryError, ReleasedError, BackendError)

__all__ = ["Pool", "VirtualTensor", "HostBuffer", "TAGS", "OutOfMemoryError", "ReleasedError", "BackendError",
           "parse_bytes", "format_bytes", "enable", "is_enabled", "configure", "mem_pool", "tag", "pool",
           "memory_stats", "memory_summary", "empty_cache", "reset_peak_memory_stats", "record_stream",
           "grant_peer_access", "plot_timeline"]
