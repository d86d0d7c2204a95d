"""Swapping, eLLM's CPU tier: a preempted request's K/V go to a host buffer from the pool's host
budget, and come back into fresh blocks when it is scheduled again, one layer ahead of the model so
that the copies overlap its compute. Unlike borrowing (host chunks mapped at the KV cache's own
address, read in place), this needs no host-mapped memory and the model never reads host memory."""
import threading
import time

import torch

from torch_ellm.errors import OutOfMemoryError


def _runs(blocks):
    """(index in blocks, first block, length) of each run of consecutive block numbers: one copy each."""
    runs = []
    for i, block in enumerate(blocks):
        if runs and runs[-1][1] + runs[-1][2] == block:
            runs[-1][2] += 1
        else:
            runs.append([i, block, 1])
    return runs


class _Swapped:
    """One request's K/V in host memory: the buffer and the tensor view the copies use."""

    def __init__(self, buf, host):
        self.buf, self.host = buf, host

    def release(self):
        self.host = None  # the buffer refuses to go while a view of it lives
        self.buf.release()


class SwapSpace:
    """The swapped-out requests' K/V in host buffers, one per request: [layer, block, K|V, slot, head, dim].

    overlap=False copies every layer back before the step runs instead (for comparison)."""

    def __init__(self, pool, kv_cache, overlap=True):
        self.pool, self.kv, self.overlap = pool, kv_cache, overlap
        self._held = {}  # seq -> _Swapped

    @property
    def nbytes(self):
        return sum(s.buf.nbytes for s in self._held.values())

    def holds(self, seq):
        return seq in self._held

    def swap_out(self, seq, allowance):
        """Copy the blocks holding seq's computed K/V to host memory, if that stays within `allowance`
        bytes of swap space and the pool's host budget. True if done (seq's blocks may then be freed)."""
        blocks = seq.block_table[:-(-seq.num_computed // self.kv.block_shape[1])]
        nbytes = len(self.kv.layers) * len(blocks) * self.kv.block_bytes
        if not blocks or self.nbytes + nbytes > allowance:
            return False
        try:
            buf = self.pool.host_buffer(nbytes, tag="kv")
        except OutOfMemoryError:
            return False
        host = buf.as_tensor((len(self.kv.layers), len(blocks), *self.kv.block_shape), self.kv.dtype)
        for layer, cache in enumerate(self.kv.views):
            for i, block, n in _runs(blocks):
                host[layer, i:i + n].copy_(cache[block:block + n])
        self._held[seq] = _Swapped(buf, host)
        return True

    def swap_in(self, seqs):
        """Start copying seqs' K/V (each now holding fresh blocks) back; returns the LayerCopies the
        model waits on, layer by layer. Their host buffers go back to the pool when it finishes."""
        jobs = [(self._held.pop(seq), seq.block_table) for seq in seqs]
        return LayerCopies(self.kv.views, jobs, self.overlap)

    def discard(self, seq):
        """seq finished or was aborted while swapped out."""
        held = self._held.pop(seq, None)
        if held:
            held.release()

    def release(self):
        for seq in list(self._held):
            self.discard(seq)


class LayerCopies:
    """Host-to-device copies of some requests' K/V, issued layer by layer ahead of the model: on CUDA on a
    side stream (the model's stream waits on each layer's event), on CPU in a worker thread. wait(layer)
    before the model touches that layer's cache; finish() after the step."""

    def __init__(self, caches, jobs, overlap):
        self.caches, self.jobs = caches, jobs
        self.waited = 0.0  # seconds the model waited for copies (all of their time, not overlapped)
        self.device = caches[0].device if caches else torch.device("cpu")
        self._error = None
        if not jobs:
            self._done = None
        elif not overlap:  # the model waits for all of it
            start = time.perf_counter()
            for layer in range(len(caches)):
                self._copy(layer)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self.waited = time.perf_counter() - start
            self._done = None
        elif self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # earlier users of these blocks
            self._done = []
            with torch.cuda.stream(self._stream):
                for layer in range(len(caches)):
                    self._copy(layer)
                    self._done.append(self._stream.record_event())
        else:
            self._done = [threading.Event() for _ in caches]
            self._worker = threading.Thread(target=self._copy_all, name="ellm-swap-in", daemon=True)
            self._worker.start()

    def _copy(self, layer):
        cache = self.caches[layer]
        for swapped, blocks in self.jobs:
            host = swapped.host
            for i, block, n in _runs(blocks[:host.shape[1]]):
                cache[block:block + n].copy_(host[layer, i:i + n], non_blocking=True)

    def _copy_all(self):
        try:
            for layer, done in enumerate(self._done):
                self._copy(layer)
                done.set()
        except Exception as e:  # handed to the model's thread, which waits on these events
            # A new error without e's traceback: its frames would keep views of the host buffers alive.
            self._error = RuntimeError(f"copying swapped K/V back failed: {e!r}")
            for done in self._done:
                done.set()

    def wait(self, layer):
        """Block (CPU) or order the model's stream (CUDA) until layer's K/V have landed."""
        if self._done is None:
            return
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self._done[layer])
        else:
            self._done[layer].wait()
            if self._error is not None:
                raise self._error
        self.waited += time.perf_counter() - start

    def finish(self):
        """All copies done (the host buffers are free to go); gives the buffers back to the pool."""
        if self._done is not None:
            if self.device.type == "cuda":
                self._stream.synchronize()
            else:
                self._worker.join()
        for swapped, _ in self.jobs:
            swapped.release()
        self.jobs, self.caches = [], []  # the cache views would keep the KV cache from shrinking
