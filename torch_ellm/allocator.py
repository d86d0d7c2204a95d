"""enable(): every CUDA tensor of the process carved from the elastic pool.

The allocator lives in torch_ellm._C (csrc/caching_allocator.cpp) and is registered with
torch.cuda.memory.CUDAPluggableAllocator. With it, torch.cuda.memory_stats() and friends raise
(PyTorch's pluggable allocators have no stats hook), so memory_stats() and memory_summary()
here give the same information with PyTorch's key names.
"""
import contextlib
import os

import torch

from . import _C, shim
from .pool import TAGS, Pool
from .sizes import format_bytes, parse_bytes

ENV = "TORCH_ELLM_CONF"
_KEYS = {"budget": "budget", "host_budget": "host_budget", "chunk": "chunk", "fraction": "fraction"}
_state = {"enabled": False}


def parse_conf(text):
    """'budget:70GiB,host_budget:32GiB,chunk:2MiB,fraction:0.9' -> dict; ValueError naming a bad part."""
    conf = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition(":")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise ValueError(f"{ENV}: cannot read {part!r}; expected key:value with key in {', '.join(_KEYS)}")
        conf[key] = value.strip()
    return conf


def _settings(budget, host_budget, chunk, fraction):
    conf = parse_conf(os.environ.get(ENV, ""))
    given = {"budget": budget, "host_budget": host_budget, "chunk": chunk, "fraction": fraction}
    conf.update({k: v for k, v in given.items() if v is not None})
    fraction = float(conf.get("fraction", 1.0))
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    chunk = parse_bytes(conf.get("chunk", 0), "chunk")
    return {"budget": parse_bytes(conf.get("budget", 0), "budget"), "fraction": fraction,
            "host_budget": parse_bytes(conf.get("host_budget", 0), "host_budget"), "chunk": chunk}


def configure(backend="cuda", budget=None, host_budget=None, chunk=None, fraction=None, granularity="2MiB"):
    """Set the allocator's pool settings without registering it with PyTorch (enable() calls this).
    backend="host" drives the same allocator over CPU memory, for tests and benchmarks.
    budget defaults to fraction (default 1.0) of the device's memory."""
    s = _settings(budget, host_budget, chunk, fraction)
    _C.configure_allocator(backend, s["budget"], s["fraction"], s["host_budget"], s["chunk"],
                           parse_bytes(granularity, "granularity"))


def enable(budget=None, host_budget=None, chunk=None, fraction=None):
    """Route every CUDA allocation of this process through torch_ellm's pool.

    Call it first, before anything touches CUDA memory. Settings come from keyword arguments,
    else from TORCH_ELLM_CONF (e.g. "budget:70GiB,host_budget:32GiB,chunk:2MiB"). One pool per
    visible GPU is made on first use. An exhausted pool raises torch.OutOfMemoryError, and
    torch.cuda.empty_cache(), Tensor.record_stream and set_per_process_memory_fraction reach the
    pool, through a small shim compiled once (see torch_ellm/shim.py); where it cannot be built,
    enable() warns and registers alloc/free alone.
    """
    if _state["enabled"]:
        return
    if not torch.cuda.is_available():
        raise RuntimeError("torch_ellm.enable() needs CUDA, and torch.cuda.is_available() is False. On CPU, use "
                           "torch_ellm.Pool(backend='host') and virtual tensors directly.")
    configure("cuda", budget, host_budget, chunk, fraction)
    try:
        if not shim.install_cuda_allocator():
            torch.cuda.memory.change_current_allocator(_python_allocator())
    except RuntimeError as e:
        raise RuntimeError("torch_ellm.enable() must run before this process allocates any CUDA memory: PyTorch "
                           f"refuses to swap an allocator already in use ({e}). Call enable() first thing in your "
                           "script, before models or tensors go to CUDA.") from e
    _state["enabled"] = True


def _python_allocator(alloc="torch_ellm_alloc"):
    return torch.cuda.memory.CUDAPluggableAllocator(_C.__file__, alloc, "torch_ellm_free")


def is_enabled():
    return _state["enabled"]


def mem_pool():
    """A torch.cuda.MemPool backed by torch_ellm, for the scoped route (PyTorch 2.5+):
    `with torch.cuda.use_mem_pool(torch_ellm.mem_pool()): ...` puts only that code in the pool.
    Call configure() first to set the budget. PyTorch's caching allocator still caches and
    splits inside a MemPool; routing is per thread. Out of memory there: PyTorch frees the MemPool's
    cached blocks back to torch_ellm, retries, then raises torch.OutOfMemoryError."""
    return torch.cuda.MemPool(_python_allocator("torch_ellm_alloc_or_null").allocator())


@contextlib.contextmanager
def tag(name):
    """Allocations made inside (on this thread) are counted under name: weights, activations, kv
    or other. The default is activations."""
    if name not in TAGS:
        raise ValueError(f"unknown tag {name!r}: expected one of {', '.join(TAGS)}")
    previous = _C.get_tag()
    _C.set_tag(name)
    try:
        yield
    finally:
        _C.set_tag(previous)


def _device_index(device):
    if device is None:
        return torch.cuda.current_device() if _state["enabled"] else 0
    if isinstance(device, torch.device):
        return device.index or 0
    if isinstance(device, str):
        return torch.device(device).index or 0
    return int(device)


def pool(device=None):
    """The Pool behind the allocator on device (made on first use): set_budget, events, policy."""
    d = _device_index(device)
    return Pool._wrap(_C.allocator_pool(d))


def is_allocator_pool(p):
    """Whether p is the pool that enable() routes this process's CUDA tensors through."""
    return _state["enabled"] and p.backend == "cuda" and _C.allocator_pool(p.device.index or 0) is p._pool


def memory_stats(device=None):
    """torch.cuda.memory_stats()-style flat dict for device: allocated_bytes.all.current/peak,
    reserved_bytes.all.current/peak, num_alloc_retries, num_ooms, ..., plus ellm.* keys: CUDA graph pools
    (graph_pools, graph_pool_cached_bytes: free, kept for the graphs' replays) and, from the pool,
    borrowed_bytes, host_buffer_bytes, budget_bytes, device_bytes, ellm.tag.<tag>.device_bytes/host_bytes."""
    d = _device_index(device)
    out = {k: int(v) for k, v in _C.allocator_stats(d).items()}
    p = pool(d).stats()
    for tag_name, by in p.pop("bytes_by_tag").items():
        for k, v in by.items():
            out[f"ellm.tag.{tag_name}.{k}"] = v
    out.update({f"ellm.{k}": v for k, v in p.items()})
    return out


def memory_summary(device=None):
    """A readable table of memory_stats()."""
    s = memory_stats(device)
    rows = [("Allocated", s["allocated_bytes.all.current"], s["allocated_bytes.all.peak"]),
            ("Reserved (mapped by the allocator)", s["reserved_bytes.all.current"], s["reserved_bytes.all.peak"]),
            ("Pool device chunks in use", s["ellm.device_bytes"], s["ellm.device_peak_bytes"]),
            ("Borrowed host memory", s["ellm.borrowed_bytes"], s["ellm.borrowed_peak_bytes"]),
            ("Host buffers (swapped KV)", s["ellm.host_buffer_bytes"], None),
            (f"Free in CUDA graph pools ({s['ellm.graph_pools']})", s["ellm.graph_pool_cached_bytes"], None)]
    rows += [(f"  tag {t}", s[f"ellm.tag.{t}.device_bytes"] + s[f"ellm.tag.{t}.host_bytes"], None) for t in TAGS]
    lines = [f"torch_ellm memory summary, device {_device_index(device)}",
             f"{'':38}{'current':>14}{'peak':>14}"]
    lines += [f"{name:38}{format_bytes(cur):>14}{'' if peak is None else format_bytes(peak):>14}"
              for name, cur, peak in rows]
    lines.append(f"budget {format_bytes(s['ellm.budget_bytes'])}, host budget "
                 f"{format_bytes(s['ellm.host_budget_bytes'])}, chunk {format_bytes(s['ellm.chunk_bytes'])}, "
                 f"allocations {s['allocation.all.current']}, segments {s['segment.all.current']}, "
                 f"retries {s['num_alloc_retries']}, OOMs {s['num_ooms']}")
    return "\n".join(lines)


def empty_cache():
    """Unmap every cached free block on every device and give the chunks back to the driver."""
    freed = 0
    for d in _C.allocator_devices():
        freed += _C.allocator_empty_cache(d)  # and the pool's trim, unless a CUDA graph is being captured
    return freed


def reset_peak_memory_stats(device=None):
    _C.allocator_reset_peak_stats(_device_index(device))


def record_stream(tensor, stream):
    """tensor's memory is also used on stream: it is reused only after work queued there ends.
    Tensor.record_stream does the same under enable() when the shim's CUDA hooks are built; without
    them PyTorch ignores it for a pluggable allocator, and this is the way."""
    _C.allocator_record_stream(tensor.untyped_storage().data_ptr(), tensor.device.index or 0, stream.cuda_stream)


def grant_peer_access(tensor, peer_device):
    """Let peer_device read and write tensor's memory (per-range cuMemSetAccess)."""
    _C.allocator_grant_access(tensor.untyped_storage().data_ptr(), tensor.device.index or 0,
                              _device_index(peer_device))
