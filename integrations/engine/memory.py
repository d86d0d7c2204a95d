"""Memory modes and activation accounting.

At start-up the activation bytes of a step are measured as a function of its batched tokens (the
way vLLM sizes its reserve): each profile run is a chunk of T tokens at the end of a max-length
context, the worst case for T tokens. Then:
- static: the activation peak for max_batched_tokens is reserved once; the rest of the budget becomes
  a fixed KV pool.
- elastic: before each step the pool is told to keep the step's activation bytes free (its
  keep_free_bytes, which every tag but 'activations' must leave alone); the KV cache maps blocks only as
  they are used. The KV cache's free tail is given back lazily, when a later step needs the room, and
  all of it when the engine goes idle: KV and activations compete for one budget.
The room is kept, never mapped by the engine: on CUDA under enable() the activations really come from
the pool, into that room; elsewhere the framework's own allocator holds them beside the pool, which
then leaves their bytes of its budget unused (mapping a stand-in would take them twice, and cost a
driver call a chunk)."""
import bisect
import time
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from torch_ellm.errors import OutOfMemoryError


def _round_up(n, unit):
    return -(-n // unit) * unit


class _PeakBytes(TorchDispatchMode):
    """Live bytes of the storages allocated inside the mode, and their peak. A storage counts while
    any tensor produced inside the mode still refers to it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs = {}  # storage address -> [tensors alive, bytes]

    def _drop(self, key):
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key in self._refs:
                self._refs[key][0] += 1
            elif key in inputs or t.untyped_storage().nbytes() == 0:
                continue  # a view or in-place result of something allocated before the mode (weights)
            else:
                self._refs[key] = [1, t.untyped_storage().nbytes()]
                self.live += self._refs[key][1]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._drop, key)
        return out


class ActivationProfile:
    """Measured activation bytes at a few batched-token counts; estimates interpolate linearly
    between them and round up."""

    def __init__(self, tokens, nbytes):
        self.tokens, self.nbytes = list(tokens), list(nbytes)

    @classmethod
    def measure(cls, runner, kv_cache, max_batched_tokens, points=2):
        """kv_cache: a scratch cache with room for ceil(max_batched_tokens / max_model_len) full contexts."""
        from .sequence import Sequence
        from .sampling_params import SamplingParams

        max_len = runner.max_model_len
        tokens = sorted({max(1, max_batched_tokens * i // points) for i in range(points + 1)})
        measured = []
        for t in tokens:
            chunks, next_block = [], 0
            for piece in [max_len] * (t // max_len) + ([t % max_len] if t % max_len else []):
                seq = Sequence(-1, [0] * max_len, SamplingParams())
                seq.num_computed = max_len - piece
                blocks = -(-max_len // kv_cache.block_shape[1])
                seq.block_table = list(range(next_block, next_block + blocks))
                next_block += blocks
                chunks.append((seq, piece))
            chunks.sort(key=lambda c: c[1] == 1)  # a 1-token piece runs in the decode path
            with _PeakBytes() as tracker:
                runner.run(chunks, kv_cache)
            measured.append(tracker.peak)
        return cls(tokens, measured)

    def bytes_for(self, num_tokens):
        """Activation bytes of a step with num_tokens batched tokens (0 for none)."""
        if num_tokens <= 0:
            return 0
        xs, ys = [0] + self.tokens, [0] + self.nbytes
        i = min(max(bisect.bisect_left(xs, num_tokens), 1), len(xs) - 1)
        (t0, t1), (b0, b1) = xs[i - 1:i + 1], ys[i - 1:i + 1]
        return max(0, -(-(b0 * (t1 - num_tokens) + b1 * (num_tokens - t0)) // (t1 - t0)))


def host_read_seconds(pool, most_bytes=None, repeats=7):
    """Seconds that reading a byte of KV borrowed to host memory takes beyond reading it on the device
    (across PCIe on a GPU; nothing on the CPU, where both are host memory): what attention pays a step
    for each borrowed byte. Measured on a scratch tensor of the pool, half of it moved to host memory at
    the same address, the halves read in turn. At most most_bytes (on CUDA 256 MiB: each half must
    outgrow the GPU's L2 cache, some 50 MB, which caches host memory too; 32 MiB on the host), within
    the whole chunks the pool has free on both sides without asking anyone to give memory up. None
    where that is not two chunks, where the pool parks host memory unmapped (nothing reads it in place
    there), or where another user of the pool moved the scratch meanwhile."""
    if pool.host_tier != "mapped":
        return None
    most_bytes = most_bytes or (256 << 20 if pool.backend == "cuda" else 32 << 20)
    chunk = pool.chunk_bytes
    # In whole chunks, as the pool counts: the budget's, less keep_free_bytes rounded up.
    device_free = (pool.budget_bytes // chunk - pool.mapped_device_bytes // chunk
                   - -(-pool.policy["keep_free_bytes"] // chunk)) * chunk
    host_free = pool.host_budget_bytes - pool.borrowed_bytes - pool.host_buffer_bytes
    half = min(most_bytes // 2, device_free // 2, host_free) // chunk * chunk
    if half <= 0:
        return None
    scratch = pool.virtual_tensor(2 * half, tag="kv")
    try:
        return _extra_read_seconds(scratch, half, repeats)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # their views of scratch would refuse the release
        if isinstance(e, OutOfMemoryError):  # another user of the pool took the room meanwhile
            return None
        raise
    finally:
        scratch.release()


def _extra_read_seconds(scratch, half, repeats):
    scratch.resize(2 * half)
    if scratch.offload(half, 2 * half) < half:
        return None
    on_device, in_host = (scratch.as_tensor((half // 4,), torch.float32, offset) for offset in (0, half))
    on_device.fill_(1.0)
    in_host.fill_(1.0)
    best = [float("inf")] * 2
    for _ in range(repeats):  # in turn, the fastest of each: the first read may pay for faults, noise is slower
        for i, view in enumerate((on_device, in_host)):
            if view.is_cuda:
                torch.cuda.synchronize(view.device)
            start = time.perf_counter()
            view.sum().item()
            best[i] = min(best[i], time.perf_counter() - start)
    if scratch.host_bytes != half:  # another engine's end_step brought it back: not what was measured
        return None
    extra = best[1] - best[0]
    return extra / half if extra > 0.5 * best[0] else 0.0  # within half: the same memory, and noise


class Memory:
    """Decides whether a step's KV blocks and activations fit the budget, maps the KV around the step
    and keeps the pool's keep_free_bytes at the room its activations need (the step's in elastic mode,
    the peak in static mode).

    The pool may be shared. What other tenants map (weights, the caller's tensors) is not the engine's
    to use, what the pool's consumers would give back when asked (the allocator's cached blocks) is, and
    the pool's keep_free_bytes beyond the engine's own room (set by the caller before or after the engine
    was made, or another engine's room) stays kept free for others: the engine adds and takes back only
    its own share."""

    def __init__(self, pool, kv_cache, profile, mode, max_batched_tokens, borrow=False):
        if mode not in ("static", "elastic"):
            raise ValueError(f"mode must be 'static' or 'elastic', got {mode!r}")
        self.pool, self.kv, self.profile, self.mode = pool, kv_cache, profile, mode
        self.borrow = borrow  # whether a step may run with some of its KV borrowed to host memory
        self.peak_activation_bytes = _round_up(profile.bytes_for(max_batched_tokens), pool.chunk_bytes)
        self.activation_room = 0  # what the pool keeps free for the step that runs (or ran last)
        self.released = False
        self.static_blocks = 0
        self._step_bytes = {}  # step_bytes() by token count: the profile and the mode do not change
        if mode == "static":
            if self.peak_activation_bytes > self.room_alone():
                raise ValueError(f"{self.budget_text()} cannot hold the activation peak "
                                 f"{self.peak_activation_bytes} B of {max_batched_tokens} batched tokens")
            self._keep_room(self.peak_activation_bytes)
            try:
                self.static_blocks = self._blocks_within(self.device_room() - self._headroom(max_batched_tokens))
                kv_cache.resize(self.static_blocks)
            except BaseException:
                self._keep_room(0)  # a failed engine leaves the pool's policy as it found it
                raise

    def device_room(self):
        """Device bytes the engine may still map now."""
        return self._usable_budget() - self.pool.mapped_device_bytes + self.pool.releasable_bytes()

    def _usable_budget(self):
        """The budget less what the pool keeps free for others (the pool keeps whole chunks)."""
        return self.pool.budget_bytes - _round_up(self.kept_for_others, self.pool.chunk_bytes)

    def others_bytes(self):
        """Device bytes the pool's other tenants hold that its consumers would not give back."""
        own = self.kv.device_bytes
        return max(0, self.pool.mapped_device_bytes - own - self.pool.releasable_bytes())

    def room_alone(self):
        """Device bytes the engine would have with none of its requests running."""
        return self._usable_budget() - self.others_bytes()

    def budget_text(self):
        """The budget and what others take of it, for error messages."""
        kept = self.pool.budget_bytes - self._usable_budget()
        taken = [f"{n} B {what}" for n, what in ((self.others_bytes(), "held by the pool's other tenants"),
                                                  (kept, "kept free for others")) if n]
        return f"the budget of {self.pool.budget_bytes} B" + (f" ({', '.join(taken)})" if taken else "")

    def _headroom(self, num_tokens):
        """Bytes the pool keeps free for a step's activations."""
        return self.peak_activation_bytes if self.mode == "static" else self._step_activation_bytes(num_tokens)

    @property
    def kept_for_others(self):
        """The pool's keep_free_bytes less the engine's own room: what it keeps free for others."""
        return max(0, self.pool.policy["keep_free_bytes"] - self.activation_room)

    def _keep_room(self, nbytes):
        self.pool.set_policy(keep_free_bytes=self.kept_for_others + nbytes)
        self.activation_room = nbytes

    def host_budget(self):
        """Host bytes a step's KV may borrow: none unless preempting by borrowing, and none where the
        pool parks (it never borrows on its own there)."""
        return self.pool.host_budget_bytes if self.borrow and self.pool.host_tier == "mapped" else 0

    def host_room(self):
        return self.host_budget() - self.pool.borrowed_bytes

    def _blocks_within(self, nbytes):
        """The most blocks the KV cache could map with nbytes more than it has now."""
        lo, hi = self.kv.num_blocks, self.kv.max_blocks
        while lo < hi:  # bytes_to_resize grows with the block count: bisect
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.kv.bytes_to_resize(mid) <= nbytes else (lo, mid - 1)
        return lo

    def _kv_blocks(self, high_water):
        """Blocks to map for a step: elastic maps just the high water (its free tail goes), static never
        drops below its fixed pool."""
        return high_water if self.mode == "elastic" else max(high_water, self.static_blocks)

    def _kv_growth(self, num_blocks):
        """Device bytes the KV cache takes (or frees: negative) resizing to num_blocks. Unmapping frees
        device memory only where the KV is on the device, not borrowed."""
        return max(self.kv.bytes_to_resize(num_blocks), -self.kv.device_bytes)

    def _step_activation_bytes(self, num_tokens):
        return _round_up(self.profile.bytes_for(num_tokens), self.pool.chunk_bytes)

    def fits(self, high_water, num_tokens, host_allowance=0):
        """Would a step with num_tokens tokens whose KV reaches block high_water fit, borrowing at most
        host_allowance bytes of host memory? Borrowing moves KV already on the device, so it frees no
        more than that."""
        kv_growth = self._kv_growth(self._kv_blocks(high_water))
        need = kv_growth + self._headroom(num_tokens)
        room = self.device_room()
        if need <= room or host_allowance <= 0:
            return need <= room
        on_device = self.kv.device_bytes + min(0, kv_growth)  # KV the step unmaps frees room once, not twice
        return need <= room + min(host_allowance, self.host_room(), on_device)

    def step_bytes(self, num_tokens):
        """The part of fits() that depends on a step's tokens: two token counts with the same step_bytes
        fit or not alike (the bytes are whole chunks, so most steps a decode adds to share them)."""
        if num_tokens not in self._step_bytes:  # asked for every request the scheduler takes, every step
            self._step_bytes[num_tokens] = self._headroom(num_tokens)
        return self._step_bytes[num_tokens]

    def _idle_host_bytes(self):
        """Host bytes the KV may take with none of the engine's requests running: the borrowing allowance,
        and in static mode at least what the pool moved there already (the fixed pool stays mapped)."""
        return self.host_budget() if self.mode == "elastic" else max(self.kv.host_bytes, self.host_budget())

    def fits_alone(self, blocks, num_tokens):
        """Could a request's first step, num_tokens tokens with `blocks` KV blocks mapped, run with nothing
        else in the pool? Borrowing moves KV already on the device: in elastic mode there is none yet."""
        if self.mode == "static":  # its fixed KV pool is mapped even when idle: some may be in host memory,
            kv_bytes = self.kv.bytes_for(max(blocks, self.static_blocks))  # but not the chunks a step maps
            newest = self.kv.bytes_for(1) if blocks > self.static_blocks else 0
            borrowable = min(self._idle_host_bytes(), kv_bytes - newest)
            return kv_bytes + self.peak_activation_bytes <= self.room_alone() + borrowable
        return self.kv.bytes_for(blocks) + self._step_activation_bytes(num_tokens) <= self.room_alone()

    def max_blocks_alone(self):
        """The most KV blocks one request could ever hold (all others gone, the host budget borrowed): what
        the budget leaves beside the activation peak, plus host memory (static mode: at least its pool)."""
        # A step that grows the KV maps its new chunks on the device, beside its activations (static mode
        # keeps the peak free for them; elastic mode's smallest step is one token).
        least_step = self.peak_activation_bytes if self.mode == "static" else self._step_activation_bytes(1)
        room_alone = self.room_alone()
        if room_alone - least_step < self.kv.bytes_for(1):
            return self.static_blocks
        room = room_alone - self.peak_activation_bytes + self._idle_host_bytes()
        chunks_per_layer = max(0, room) // (len(self.kv.layers) * self.pool.chunk_bytes)
        blocks = chunks_per_layer * self.pool.chunk_bytes // self.kv.block_bytes
        return min(self.kv.max_blocks, max(blocks, self.static_blocks))

    def begin_step(self, high_water, num_tokens):
        """Map the KV the step needs and keep its activations' room free before it runs (OutOfMemoryError
        if it does not fit).

        Elastic mode deflates lazily, as eLLM does: the KV cache's free tail that earlier steps left
        mapped stays mapped while this step fits beside it, and is given back only when it does not (a
        prefill needing room). That saves a map and an unmap of every chunk on every step."""
        kv_blocks, headroom = self._kv_blocks(high_water), self._headroom(num_tokens)
        if self.mode == "elastic":
            lazy_kv = max(kv_blocks, self.kv.num_blocks)
            if self.kv.bytes_to_resize(lazy_kv) + headroom <= self.device_room():
                kv_blocks = lazy_kv
        # A step fits() allowed host memory for borrows it here, before anything grows: a KV layer being
        # resized lends none of its own chunks, and keep_free below shuts the KV out of the headroom.
        short = self._kv_growth(kv_blocks) + headroom - self.device_room()
        if short > 0:
            self.pool.borrow(short)
        if self.mode == "elastic":
            self._keep_room(headroom)
        self.kv.resize(kv_blocks)

    def end_step(self, high_water, idle):
        """After a step. Static mode keeps its fixed KV pool; elastic mode keeps what the step mapped
        for the next one (begin_step gives it back when needed) until the engine is idle, and then
        gives everything back, its activations' room included. Borrowed KV comes home when there is
        room."""
        if self.mode == "static" or idle:
            if self.mode == "elastic":
                self._keep_room(0)
            self.kv.resize(self._kv_blocks(high_water))
        if self.pool.borrowed_bytes:
            self.pool.return_borrowed()

    def release(self):
        """Give the KV cache back and take the engine's room out of the pool's keep_free_bytes; releasing
        again does nothing."""
        if not self.released:
            self.released = True
            self.kv.release()
            self._keep_room(0)
