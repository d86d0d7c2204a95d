"""The paged KV cache: per layer one virtual tensor of blocks [block, K|V, slot, kv_head, head_dim].
Only blocks below the mapped size are backed by memory; resize() inflates or deflates all layers."""
import torch


class KVCache:
    def __init__(self, pool, num_layers, num_kv_heads, head_dim, block_size, max_blocks, dtype):
        self.pool = pool
        self.block_shape = (2, block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self.block_bytes = 2 * block_size * num_kv_heads * head_dim * dtype.itemsize  # one layer
        self.max_blocks = max_blocks
        self.layers = [pool.virtual_tensor(max_blocks * self.block_bytes, tag="kv") for _ in range(num_layers)]
        self.views = []
        self._mapped_views = []  # per layer, every block the mapped chunks hold; views are its first num_blocks
        self.num_blocks = 0
        self.on_shrink = None  # called with the new block count when the blocks above it lose their K/V

    def _mapped_bytes(self, num_blocks):
        chunk = self.pool.chunk_bytes
        return -(-num_blocks * self.block_bytes // chunk) * chunk

    def bytes_for(self, num_blocks):
        """Bytes num_blocks blocks map, over all layers."""
        return len(self.layers) * self._mapped_bytes(num_blocks)

    def bytes_to_resize(self, num_blocks):
        """Bytes resize(num_blocks) would map (negative: unmap), over all layers."""
        return self.bytes_for(num_blocks) - self.bytes_for(self.num_blocks)

    def resize(self, num_blocks):
        """Map exactly enough chunks for num_blocks blocks in every layer. If that fails (OutOfMemoryError,
        or a view of the cache still alive refusing a shrink) every layer is put back as it was."""
        if num_blocks == self.num_blocks:
            return
        old = self.num_blocks
        if num_blocks < old and self.on_shrink:  # before: a shrink failing halfway has lost K/V too
            self.on_shrink(num_blocks)
        if self._mapped_bytes(num_blocks) == self._mapped_bytes(old):  # within the mapped chunks: most steps
            self.num_blocks = num_blocks
            self.views = [whole[:num_blocks] for whole in self._mapped_views]
            return
        # Pool chunks come back with whatever bytes they held (a tenant's, activations'). Decodes read
        # whole blocks and mask the slots past each context, but a masked NaN still poisons the sum:
        # every slot attention can read holds K/V or zeros. Blocks in chunks mapped before were zeroed
        # then and have held only K/V since; per layer, blocks from fresh[i] on are in new chunks.
        fresh = [self._mapped_views[0].shape[0] if self._mapped_views else 0] * len(self.layers)
        self.views = self._mapped_views = []  # a live view would pin the bytes a shrink unmaps
        done = []
        try:
            for vt in self.layers:
                vt.resize(num_blocks * self.block_bytes)
                done.append(vt)
        except BaseException:  # OutOfMemoryError growing, or a live view refusing a shrink
            if num_blocks < old:  # the layers that shrank map their top chunks again: new ones
                fresh[:len(done)] = [self._mapped_bytes(num_blocks) // self.block_bytes] * len(done)
            num_blocks = old
            for vt in done:
                vt.resize(old * self.block_bytes)
            raise
        finally:
            self._set_views(num_blocks)
            for view, first in zip(self._mapped_views, fresh):
                view[first:].zero_()

    def _set_views(self, num_blocks):
        self.num_blocks = num_blocks
        whole = min(vt.mapped_bytes for vt in self.layers) // self.block_bytes  # all the chunks hold
        self._mapped_views = [vt.as_tensor((whole, *self.block_shape), self.dtype) for vt in self.layers]
        self.views = [view[:num_blocks] for view in self._mapped_views]

    @property
    def device_bytes(self):
        return sum(vt.mapped_bytes - vt.host_bytes for vt in self.layers)

    @property
    def host_bytes(self):
        return sum(vt.host_bytes for vt in self.layers)

    def write(self, layer, slots, k, v):
        """Store k, v [tokens, kv_heads, head_dim] at flat slot indices (block * block_size + offset)."""
        cache = self.views[layer]
        block_size = self.block_shape[1]
        blocks, offsets = slots // block_size, slots % block_size
        cache[blocks, 0, offsets] = k
        cache[blocks, 1, offsets] = v

    def release(self):
        self.views = self._mapped_views = []
        try:
            for vt in self.layers:
                vt.release()
        except BaseException:  # a live view refused it
            if not any(vt.released for vt in self.layers):  # before anything went: the cache is as it was
                self._set_views(self.num_blocks)
            raise
        self.num_blocks = 0
