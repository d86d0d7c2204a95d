"""Swapping, eLLM's CPU tier: a preempted request's K/V go to a host buffer from the pool's host
budget, and come back into fresh blocks when it is scheduled again, layer by layer, the model waiting
only for the layer it is about to use, so that the copies overlap its compute. Unlike borrowing (host
chunks mapped at the KV cache's own address, read in place), this needs no host-mapped memory and the
model never reads host memory."""
import threading
import time

import torch

from torch_ellm.errors import OutOfMemoryError
from .linear_fit import LinearFit
from .step_cost import StepCost, chunk_pairs


def _runs(blocks):
    """(index in blocks, first block, length) of each run of consecutive block numbers: one copy each."""
    runs = []
    for i, block in enumerate(blocks):
        if runs and runs[-1][1] + runs[-1][2] == block:
            runs[-1][2] += 1
        else:
            runs.append([i, block, 1])
    return runs


def _run_plainly(what, fn):
    """fn(); a failure is raised as a new RuntimeError from outside the except block: the original's
    traceback frames would keep views of host buffers and of the cache alive (a release would refuse)."""
    error = None
    try:
        fn()
    except Exception as e:
        error = RuntimeError(f"{what} failed: {e!r}")
    if error is not None:
        raise error


class _Swapped:
    """One request's K/V in host memory: the buffer, the tensor view the copies use, and how many of its
    tokens they cover."""

    def __init__(self, buf, host, num_computed):
        self.buf, self.host, self.num_computed = buf, host, num_computed

    def release(self):
        self.host = None  # the buffer refuses to go while a view of it lives
        self.buf.release()


class SwapSpace:
    """The swapped-out requests' K/V in host buffers, one per request: [layer, block, K|V, slot, head, dim].

    overlap=False copies every layer back before the step runs instead (for comparison). cost: the
    engine's StepCost, which prices recomputing instead (worth_swapping)."""

    # Every this many preemptions in a row that the costs say to recompute, one swaps anyway: copy
    # costs are only measured by swapping, and a stale one must not decide forever.
    EXPLORE = 8

    def __init__(self, pool, kv_cache, cost=None, overlap=True):
        self.pool, self.kv, self.overlap = pool, kv_cache, overlap
        self.cost = cost or StepCost()
        self._held = {}  # seq -> _Swapped
        # Seconds a swap's copies cost the engine against (1, bytes), out and back, over recent swaps.
        self.copy_out, self.copy_in = (LinearFit(2, window=16, min_samples=2, refit=1) for _ in range(2))
        self.out_seconds = 0.0  # spent swapping out, in all (the engine keeps it out of its step cost model)
        self._recomputed = 0  # preemptions since the last swap that worth_swapping sent to recompute

    @property
    def nbytes(self):
        return sum(s.buf.nbytes for s in self._held.values())

    def holds(self, seq):
        return seq in self._held

    def num_computed(self, seq):
        """Tokens of seq whose K/V are held here."""
        return self._held[seq].num_computed

    def _blocks(self, seq):
        """The blocks holding seq's computed K/V."""
        return seq.block_table[:-(-seq.num_computed // self.kv.block_shape[1])]

    def pays_off(self, seq, shared_tokens=0):
        """Whether swapping seq out and back is predicted to cost the engine less than prefilling its
        computed tokens again. shared_tokens: its leading tokens in blocks other requests hold too; they
        stay in the prefix cache, so recompute skips them and the copy back leaves them out. The copies
        are priced by what recent swaps cost (a fixed part and a part per byte), the prefill by the step
        cost model. Until both have been measured: yes (swapping is how the copies get measured)."""
        if not (self.copy_out.ready and self.copy_in.ready and self.cost.ready):
            return True
        block_size, layer_bytes = self.kv.block_shape[1], len(self.kv.layers) * self.kv.block_bytes
        blocks = len(self._blocks(seq))
        back = max(0, blocks - shared_tokens // block_size)
        copies = self.copy_out.estimate((1, blocks * layer_bytes)) + self.copy_in.estimate((1, back * layer_bytes))
        k = min(shared_tokens, seq.num_computed)
        m = seq.num_computed - k
        return copies < self.cost.extra_seconds(m, chunk_pairs(m, k))

    def worth_swapping(self, seq, shared_tokens=0):
        """pays_off(), except that every EXPLORE-th preemption in a row it refuses swaps anyway."""
        if self.pays_off(seq, shared_tokens) or self._recomputed + 1 >= self.EXPLORE:
            return True
        self._recomputed += 1
        return False

    def swap_out(self, seq, allowance):
        """Copy the blocks holding seq's computed K/V to host memory, if that stays within `allowance`
        bytes of swap space and the pool's host budget. True if done (seq's blocks may then be freed);
        False, with nothing changed, if there is no room. The allowance is checked against the size
        asked: a cached buffer the pool hands out may be up to half as large again (the budget holds)."""
        blocks = self._blocks(seq)
        chunk = self.pool.chunk_bytes
        nbytes = -(-len(self.kv.layers) * len(blocks) * self.kv.block_bytes // chunk) * chunk  # as the pool rounds
        if not blocks or self.nbytes + nbytes > allowance:
            return False
        started = time.perf_counter()  # a new buffer's page-locking is part of what a swap costs
        try:
            buf = self.pool.host_buffer(nbytes, tag="kv", optional=True)
        except OutOfMemoryError:  # past the host budget
            return False
        swapped = _Swapped(buf, buf.as_tensor((len(self.kv.layers), len(blocks), *self.kv.block_shape),
                                              self.kv.dtype), seq.num_computed)
        try:
            _run_plainly("copying K/V out to host memory", lambda: self._copy_out(swapped.host, blocks))
        except RuntimeError:
            swapped.release()
            raise
        seconds = time.perf_counter() - started
        self.out_seconds += seconds
        self.copy_out.add((1, swapped.host.nbytes), seconds)
        self._recomputed = 0
        self._held[seq] = swapped
        return True

    def _copy_out(self, host, blocks):
        with torch.inference_mode():
            for layer, cache in enumerate(self.kv.views):
                for i, block, n in _runs(blocks):
                    host[layer, i:i + n].copy_(cache[block:block + n], non_blocking=True)
            if self.pool.device.type == "cuda":
                torch.cuda.current_stream(self.pool.device).synchronize()  # the blocks are freed next

    def swap_in(self, admitted):
        """The copies of K/V back into the cache, not started, for admitted: (seq, leading blocks of its
        table that it found in the prefix cache, which are not copied), each seq now holding fresh blocks
        after those. The caller starts them, waits layer by layer, and finishes; the K/V stay held here
        until done(seqs)."""
        jobs = [(self._held[seq], seq.block_table, first) for seq, first in admitted]
        return LayerCopies(self.kv, jobs, self.overlap)

    def done(self, seqs, copies):
        """seqs' K/V are back in the cache by `copies` (finished): give the host buffers back."""
        if copies.nbytes:
            self.copy_in.add((1, copies.nbytes), copies.seconds)
        for seq in seqs:
            self.discard(seq)

    def discard(self, seq):
        """Give seq's host buffer back, if it holds one (also when it finished or was aborted while swapped)."""
        held = self._held.pop(seq, None)
        if held:
            held.release()

    def release(self):
        for seq in list(self._held):
            self.discard(seq)


class LayerCopies:
    """Host-to-device copies of some requests' K/V, issued in layer order ahead of the model: on CUDA on a
    side stream (the model's stream waits on each layer's event), on CPU in a worker thread. start(), then
    wait(layer) before the model touches that layer's cache, then finish(), also after a failure."""

    def __init__(self, kv_cache, jobs, overlap):
        self.kv, self.jobs, self.overlap = kv_cache, jobs, overlap
        self.caches = []  # the cache's views, taken at start(): a resize before it makes new ones
        self.waited = 0.0  # seconds the host waited for copies (all of their time when not overlapped)
        self.busy = 0.0  # CPU seconds the CPU worker spent copying
        self.stalled = 0.0  # after finish(): seconds the model was held up waiting for the copies
        self._stalls = []  # CUDA: timing events around each of the model stream's waits
        self.nbytes = sum(len(kv_cache.layers) * max(0, swapped.host.shape[1] - first) * kv_cache.block_bytes
                          for swapped, _, first in jobs)
        self.device = kv_cache.pool.device
        self._done = None  # per layer: a CUDA event or a threading.Event, once started with overlap
        self._stream = self._worker = self._error = None

    def start(self):
        if not self.jobs:
            return
        self.caches = self.kv.views
        if not self.overlap:  # the model waits for all of it
            started = time.perf_counter()
            for layer in range(len(self.caches)):
                self._copy(layer)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self.waited = time.perf_counter() - started
        elif self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # earlier users of these blocks
            self._done = []
            with torch.cuda.stream(self._stream):
                for layer in range(len(self.caches)):
                    self._copy(layer)
                    self._done.append(self._stream.record_event())
        else:
            self._done = [threading.Event() for _ in self.caches]
            self._worker = threading.Thread(target=self._copy_all, name="ellm-swap-in", daemon=True)
            self._worker.start()

    def _copy(self, layer):
        """Issue layer's copies (a failure: a RuntimeError holding no views)."""
        _run_plainly("copying swapped K/V back", lambda: self._copy_layer(layer))

    def _copy_layer(self, layer):
        cache = self.caches[layer]
        with torch.inference_mode():  # the cache views may be inference tensors (made inside the model's mode)
            for swapped, blocks, first in self.jobs:
                host = swapped.host
                for i, block, n in _runs(blocks[first:host.shape[1]]):
                    cache[block:block + n].copy_(host[layer, first + i:first + i + n], non_blocking=True)

    def _copy_all(self):
        started = time.thread_time()  # not wall time: waiting for the GIL takes nothing from the model
        try:
            for layer, done in enumerate(self._done):
                self._copy(layer)
                done.set()
        except RuntimeError as e:  # handed to the model's thread, which waits on these events
            self._error = e
            for done in self._done:
                done.set()
        self.busy = time.thread_time() - started

    @property
    def seconds(self):
        """What the copies cost the engine (after finish()): the stalls where they run beside the model on
        CUDA's copy engines; on CPU the worker's time if more, as it takes cores and memory bandwidth
        from the model."""
        return self.stalled if self.device.type == "cuda" else max(self.stalled, self.busy)

    def wait(self, layer):
        """Block (CPU) or order the model's stream (CUDA) until layer's K/V have landed."""
        if self._done is None:
            return
        started = time.perf_counter()
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(stream)
            stream.wait_event(self._done[layer])
            after.record(stream)
            self._stalls.append((before, after))
        else:
            self._done[layer].wait()
            if self._error is not None:
                raise self._error
        self.waited += time.perf_counter() - started

    def finish(self):
        """Wait until no copy is in flight (the host buffers may go, the cache may shrink), and add up the
        stalls: the host's waits, and on CUDA the time the model's stream spent blocked on the copies'
        events."""
        if self._stream is not None:
            self._stream.synchronize()
        if self._worker is not None:
            self._worker.join()
        self.stalled = self.waited
        if self._stalls:
            self._stalls[-1][1].synchronize()
            self.stalled += sum(before.elapsed_time(after) for before, after in self._stalls) / 1e3
            self._stalls = []
        self.jobs, self.caches = [], []  # the cache views would keep the KV cache from shrinking
