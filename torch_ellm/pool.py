"""Pool and VirtualTensor: the Python face of the C++ core (csrc/pool.h, csrc/virtual_tensor.h)."""
import contextlib
import math
import os
import warnings

import torch

from . import _C
from .errors import ReleasedError
from .sizes import format_bytes, parse_bytes

TAGS = ("weights", "activations", "kv", "other")
_DLPACK_CODES = {True: 2, False: 0}  # float, int; bool, unsigned and bfloat16 are special-cased


def _dlpack_dtype(dtype):
    if dtype == torch.bool:
        return 6, 8
    if dtype == torch.bfloat16:
        return 4, 16
    if dtype in (torch.uint8,):
        return 1, 8
    if dtype.is_complex or not (dtype.is_floating_point or dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"as_tensor does not support dtype {dtype}")
    return _DLPACK_CODES[dtype.is_floating_point], dtype.itemsize * 8


def _view_args(shape, dtype, offset):
    """Checked (shape list, byte offset, DLPack type code, bits, end byte) of a view."""
    shape = [shape] if isinstance(shape, int) else list(shape)
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"shape must be non-negative ints, got {shape}")
    offset = parse_bytes(offset, "offset")
    if offset % dtype.itemsize:
        raise ValueError(f"offset {offset} is not a multiple of the {dtype} item size {dtype.itemsize}")
    code, bits = _dlpack_dtype(dtype)
    return shape, offset, code, bits, offset + math.prod(shape) * dtype.itemsize


def _check_tag(tag):
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}: expected one of {', '.join(TAGS)}")
    return tag


class Pool:
    """One elastic memory pool: physical chunks under a device budget and a host-borrowing budget.

    backend="host" runs on CPU memory (mmap + memfd); backend="cuda" on a GPU through the CUDA
    driver's virtual memory API. chunk_bytes is the unit of mapping (2 MiB default); on host,
    granularity (a power of two from the page size to 1 GiB dividing chunk_bytes; default the largest
    such power up to 2 MiB) is the backend's page.

    host_tier says how borrowed bytes live in host memory. "mapped": a host-located chunk is mapped
    at the same address, so the device keeps reading and writing it, and the pool borrows on its own
    under pressure. "parked": the bytes are copied to plain host memory and the address is left
    unmapped until prefetch(); only the owner's offload() parks, and the owner must prefetch before
    use. "auto" (default) is "mapped" where the backend supports it (CUDA devices reporting host
    VMM support, and the host backend) and "parked" elsewhere.
    """

    def __init__(self, backend="host", device=0, budget_bytes=None, host_budget_bytes=0, chunk_bytes=None,
                 granularity=None, host_tier="auto"):
        if backend not in ("host", "cuda"):
            raise ValueError(f"unknown backend {backend!r}: expected 'host' or 'cuda'")
        if host_tier not in ("auto", "mapped", "parked"):
            raise ValueError(f"unknown host_tier {host_tier!r}: expected 'auto', 'mapped' or 'parked'")
        if isinstance(device, torch.device):
            device = device.index or 0
        if not isinstance(device, int) or device < 0:
            raise ValueError(f"device must be a device index >= 0, got {device!r}")
        chunk = parse_bytes(chunk_bytes, "chunk_bytes") if chunk_bytes is not None else 2 << 20
        if chunk == 0:
            raise ValueError("chunk_bytes must be > 0")
        if granularity is None:
            granularity = chunk & -chunk  # largest power of two dividing the chunk
            granularity = min(granularity, 2 << 20)
        granularity = parse_bytes(granularity, "granularity")
        if budget_bytes is None:
            budget_bytes = _default_budget(backend, device)
        self._pool = _C.Pool(backend, device, parse_bytes(budget_bytes, "budget_bytes"),
                             parse_bytes(host_budget_bytes, "host_budget_bytes"), chunk, granularity,
                             host_tier == "parked")
        if host_tier == "mapped" and self._pool.parks_host:
            raise ValueError(f"host_tier='mapped' needs host-located chunks, which {backend} device {device} "
                             "does not support; use host_tier='auto' or 'parked'")
        self.backend = backend
        self.device = torch.device("cpu") if backend == "host" else torch.device("cuda", device)

    @classmethod
    def _wrap(cls, c_pool):
        """A Pool object over an existing core pool (the allocator's, say)."""
        self = cls.__new__(cls)
        self._pool = c_pool
        self.backend = c_pool.backend_name
        self.device = torch.device("cpu") if self.backend == "host" else torch.device("cuda", c_pool.device)
        return self

    @property
    def chunk_bytes(self):
        return self._pool.chunk_bytes

    @property
    def budget_bytes(self):
        return self._pool.budget_bytes

    @property
    def host_budget_bytes(self):
        return self._pool.host_budget_bytes

    @property
    def host_tier(self):
        """'mapped' or 'parked': see the class docstring."""
        return "parked" if self._pool.parks_host else "mapped"

    @property
    def borrowed_bytes(self):
        """Bytes of virtual tensors now living in host memory."""
        return self._pool.borrowed_bytes

    @property
    def host_buffer_bytes(self):
        """Bytes of host buffers (host_buffer()) alive: they count against the host budget too."""
        return self._pool.host_buffer_bytes

    @property
    def mapped_device_bytes(self):
        """Device bytes mapped into virtual tensors (what the budget holds now, less the free cache)."""
        return self._pool.mapped_device_bytes

    def capabilities(self):
        c = self._pool.capabilities()
        return {"virtual_memory": c.virtual_memory, "host_chunks": c.host_chunks,
                "host_location": c.host_location, "device_name": c.device_name,
                "granularity": self._pool.granularity}

    def virtual_tensor(self, max_bytes, tag="other"):
        """Reserve max_bytes of address space; nothing is mapped until resize()."""
        return VirtualTensor(self, self._pool.virtual_tensor(parse_bytes(max_bytes, "max_bytes"), _check_tag(tag)))

    def host_buffer(self, nbytes, tag="kv", optional=False):
        """Page-locked host memory of nbytes (rounded up to whole chunks) from the host budget, beside
        borrowed chunks: OutOfMemoryError past it. For bytes the owner copies out of device memory and
        back itself (swapped KV); see HostBuffer. Released buffers stay cached for reuse (page-locking
        is slow) while the host budget has room; a cached one up to 1.5x nbytes may be handed out, so
        check .nbytes. trim() frees the cache. optional=True: the caller can do without (swapping falls
        back to recompute), so a refusal past the budget is not counted in num_ooms."""
        return HostBuffer(self._pool.host_buffer(parse_bytes(nbytes, "nbytes"), _check_tag(tag), bool(optional)))

    def stats(self):
        """Counters as a flat dict of ints, plus bytes_by_tag()."""
        s = {k: int(v) for k, v in self._pool.stats().items()}
        s["bytes_by_tag"] = self.bytes_by_tag()
        return s

    def bytes_by_tag(self):
        """{tag: {'device_bytes': int, 'host_bytes': int}}: what each tag's virtual tensors map now."""
        return {t: {k: int(v) for k, v in d.items()} for t, d in self._pool.stats_by_tag().items()}

    def trim(self):
        """Give cached free chunks back to the backend; returns the bytes released."""
        return self._pool.trim()

    def set_budget(self, budget_bytes):
        """Change the device budget while tensors are live: lowering it deflates consumers and borrows
        host memory; raises OutOfMemoryError (budget unchanged) if the live set cannot fit."""
        self._pool.set_budget(parse_bytes(budget_bytes, "budget_bytes"))

    def set_host_budget(self, host_budget_bytes):
        self._pool.set_host_budget(parse_bytes(host_budget_bytes, "host_budget_bytes"))

    def borrow(self, nbytes):
        """Move about nbytes of the coldest borrowable tensors' chunks to host memory now, as a short pool
        does by itself; returns the bytes moved (0 with no host budget or a parking host tier). A
        caller that knows it is about to grow a tensor borrows first: a growing tensor lends nothing."""
        return self._pool.borrow(parse_bytes(nbytes, "nbytes"))

    def return_borrowed(self):
        """Move borrowed chunks back to the device while the budget has room; returns bytes moved."""
        return self._pool.return_borrowed()

    def add_consumer(self, name, shrink, releasable=None, priority=0):
        """Register something that can give memory back when the pool is short: shrink(bytes_wanted)
        returns the bytes it freed (by shrinking its virtual tensors). Consumers are asked in priority
        order (lower first) before the pool borrows host memory. A consumer that raises is skipped
        (with a warning) rather than failing the allocation that asked. Returns an id."""

        def safe_shrink(want):
            try:
                return int(shrink(want))
            except Exception as e:  # an allocation elsewhere must not fail because a consumer did
                warnings.warn(f"torch_ellm: consumer {name!r} failed to shrink: {e!r}")
                return 0

        def safe_releasable():
            try:
                return int(releasable()) if releasable else 0
            except Exception:
                return 0

        return self._pool.add_consumer(name, priority, safe_shrink, safe_releasable)

    def remove_consumer(self, consumer_id):
        self._pool.remove_consumer(consumer_id)

    def releasable_bytes(self):
        """What the consumers report they could give back now (their releasable callbacks)."""
        return self._pool.releasable_bytes()

    @property
    def policy(self):
        """{'borrow': {tag: bool}, 'keep_free_bytes': int}: which tags may move to host memory, and the
        device headroom kept for activations (an imminent prefill)."""
        return self._pool.get_policy()

    def set_policy(self, borrow=None, keep_free_bytes=None):
        """Override which tags may be borrowed (e.g. {'kv': True, 'weights': False}) and the headroom."""
        current = self._pool.get_policy()
        borrow = dict(borrow or {})
        for t in borrow:
            _check_tag(t)
        keep = current["keep_free_bytes"] if keep_free_bytes is None else parse_bytes(keep_free_bytes, "keep_free_bytes")
        self._pool.set_policy(borrow, keep)

    def events(self):
        """The bounded event log: dicts with t, kind, bytes, seconds, device_bytes, host_bytes, tag_bytes."""
        return self._pool.events()

    def __repr__(self):
        s = self._pool.stats()
        return (f"Pool(backend={self.backend!r}, device={self.device}, chunk={format_bytes(self.chunk_bytes)}, "
                f"in use {format_bytes(s['device_bytes'])} of {format_bytes(s['budget_bytes'])}, "
                f"borrowed {format_bytes(s['borrowed_bytes'])})")


def _default_budget(backend, device):
    if backend == "host":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return torch.cuda.get_device_properties(device).total_memory


class VirtualTensor:
    """An address range reserved once; chunks are mapped at its end by resize(). Its address never
    changes and mapped bytes keep their contents through resizes, offloads and prefetches."""

    def __init__(self, pool, vt):
        self.pool = pool
        self._vt = vt

    @property
    def nbytes(self):
        return self._vt.nbytes

    @property
    def mapped_bytes(self):
        return self._vt.mapped_bytes

    @property
    def max_bytes(self):
        return self._vt.max_bytes

    @property
    def host_bytes(self):
        """Bytes of this tensor borrowed to host memory."""
        return self._vt.host_bytes

    @property
    def tag(self):
        return self._vt.tag

    @property
    def released(self):
        return self._vt.released

    def data_ptr(self):
        return self._vt.data_ptr()

    def resize(self, nbytes):
        """Map or unmap chunks at the end so that nbytes are usable. Growing past the budget raises
        OutOfMemoryError and leaves the tensor as it was."""
        self._vt.resize(parse_bytes(nbytes, "nbytes"))

    def try_resize(self, nbytes):
        """resize(), unless another thread is using the tensor: then return False at once. Consumer
        callbacks shrink with this, so that two threads' callbacks never wait on each other."""
        return self._vt.try_resize(parse_bytes(nbytes, "nbytes"))

    def release(self):
        """Unmap everything and give the address range back. Views must be gone first."""
        self._vt.release()

    def as_tensor(self, shape, dtype, offset=0):
        """A torch tensor viewing mapped bytes [offset, offset + numel*itemsize) without a copy. The
        view keeps those bytes mapped: shrinking below it or releasing raises until it is freed."""
        shape, offset, code, bits, end = _view_args(shape, dtype, offset)
        if self.released:
            raise ReleasedError("VirtualTensor used after release()")
        if end > self.mapped_bytes:
            raise ValueError(f"a {dtype} view of shape {shape} at offset {offset} ends at byte {end}, past the "
                             f"{self.mapped_bytes} mapped bytes; resize() first")
        dev_type, dev_id = (1, 0) if self.pool.device.type == "cpu" else (2, self.pool.device.index)
        capsule = self._vt._view(offset, shape, code, bits, dev_type, dev_id)
        return torch.utils.dlpack.from_dlpack(capsule)

    def offload(self, start=0, end=None):
        """Move bytes [start, end) (whole chunks) to host memory at the same address; returns bytes moved.
        With pool.host_tier 'parked' the range is unmapped until prefetch(): no view may cover it."""
        return self._vt.offload(start, self.mapped_bytes if end is None else end)

    def prefetch(self, start=0, end=None):
        """Bring bytes [start, end) back to device memory; returns bytes moved."""
        return self._vt.prefetch(start, self.mapped_bytes if end is None else end)

    def grant_access(self, peer_device):
        """Let another GPU read and write this range (per-range cuMemSetAccess), kept through resizes
        and moves. The host backend has no other device: ValueError."""
        self._vt.grant_access(int(peer_device))

    def chunk_locations(self):
        """'device' or 'host' for each mapped chunk, front to back."""
        return self._vt.chunk_locations()

    @contextlib.contextmanager
    def pinned(self):
        """Inside, the pool never moves this tensor to host: write through views safely."""
        self._vt.pin()
        try:
            yield self
        finally:
            self._vt.unpin()

    def __repr__(self):
        if self.released:
            return "VirtualTensor(released)"
        return (f"VirtualTensor(tag={self.tag!r}, nbytes={self.nbytes}, mapped={format_bytes(self.mapped_bytes)}, "
                f"max={format_bytes(self.max_bytes)}, host={format_bytes(self.host_bytes)})")


class HostBuffer:
    """Page-locked host memory counted against a pool's host budget (Pool.host_buffer). It has no
    device address: a device copies to and from its CPU tensor views (asynchronously, on CUDA, since
    it is pinned). release() gives it back; until then, or while a view is alive, it is held."""

    def __init__(self, buf):
        self._buf = buf

    @property
    def nbytes(self):
        return self._buf.nbytes

    @property
    def tag(self):
        return self._buf.tag

    @property
    def released(self):
        return self._buf.released

    def data_ptr(self):
        return self._buf.data_ptr()

    def as_tensor(self, shape, dtype, offset=0):
        """A CPU tensor over bytes [offset, offset + numel*itemsize), no copy. The buffer cannot be
        released while the view is alive."""
        shape, offset, code, bits, end = _view_args(shape, dtype, offset)
        if self.released:
            raise ReleasedError("HostBuffer used after release()")
        if end > self.nbytes:
            raise ValueError(f"a {dtype} view of shape {shape} at offset {offset} ends at byte {end}, past the "
                             f"{self.nbytes}-byte host buffer")
        return torch.utils.dlpack.from_dlpack(self._buf._view(offset, shape, code, bits, 1, 0))

    def release(self):
        """Give the memory back to the pool (ValueError while a view is alive; again: no-op)."""
        self._buf.release()

    def __repr__(self):
        state = "released" if self.released else format_bytes(self.nbytes)
        return f"HostBuffer({state}, tag={self.tag!r})"
