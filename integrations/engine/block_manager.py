"""Hands out KV blocks by index, lowest free index first, so that used blocks gather at the front
of each layer's virtual tensor and its tail can be unmapped."""
import heapq


class BlockManager:
    def __init__(self, block_size, max_blocks):
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._free = list(range(max_blocks))  # a heap: already sorted
        self._used = set()

    @property
    def num_used(self):
        return len(self._used)

    @property
    def high_water(self):
        """One past the highest block in use: the KV cache must map at least this many blocks."""
        return max(self._used) + 1 if self._used else 0

    def blocks_for(self, num_tokens):
        return -(-num_tokens // self.block_size)

    def high_water_after(self, extra_blocks):
        """The high water mark if extra_blocks more were allocated now (None if there are not that many)."""
        if extra_blocks == 0:
            return self.high_water
        if extra_blocks > len(self._free):
            return None
        return max(self.high_water, heapq.nsmallest(extra_blocks, self._free)[-1] + 1)

    def grow(self, seq, num_tokens):
        """Give seq enough blocks to hold num_tokens tokens."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > len(self._free):
            raise RuntimeError(f"no free KV block: {need} wanted, {len(self._free)} free")
        for _ in range(need):
            block = heapq.heappop(self._free)
            self._used.add(block)
            seq.block_table.append(block)

    def free(self, seq):
        for block in seq.block_table:
            self._used.remove(block)
            heapq.heappush(self._free, block)
        seq.block_table = []
