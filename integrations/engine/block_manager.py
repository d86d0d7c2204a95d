"""Hands out KV blocks by index, lowest free index first, so that used blocks gather at the front
of each layer's virtual tensor and its tail can be unmapped.

Prefix caching: a full block whose K/V are written is known by its key, (SHA-256 chain digest of the
blocks before it, its token ids), and a sequence starting with the same tokens reuses it in place. Blocks
count their users; one freed by its last user stays free (out of the high water, so it never keeps the
KV tail mapped) but keeps its key and contents until it is handed out anew or its chunk is unmapped.
A free block without a key that is mapped anyway goes out before a cached one: that keeps the prefix
and costs no memory."""
import array
import bisect
import hashlib
import operator


def _lowest(blocks, count):
    """The `count` lowest blocks of a free list, lowest first."""
    return blocks[:-count - 1:-1]


def _add(blocks, new):
    """Put blocks back into a free list. Only the list's tail below the highest of them is sorted again:
    requests hold the low blocks, so that tail is short (a whole sort of 300,000 free blocks took 2 ms)."""
    if new:
        cut = bisect.bisect_left(blocks, -max(new), key=operator.neg)  # the first free block below them all
        blocks[cut:] = sorted(blocks[cut:] + new, reverse=True)


class BlockManager:
    def __init__(self, block_size, max_blocks, prefix_caching=False, mapped_blocks=None):
        """mapped_blocks: how many blocks the KV cache maps now (a callable), so that keyless blocks
        below it are handed out before cached ones; by default the high water."""
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.prefix_caching = prefix_caching
        self.mapped_blocks = mapped_blocks or (lambda: 0)
        # Free lists sorted highest first: the lowest blocks, handed out next, sit at the end, so a step's
        # picks are a slice (a prefill of a long prompt takes hundreds of blocks: a heap gave 512 in 0.5 ms
        # of Python), and taking them, or putting back the low blocks requests hold, moves nothing else.
        self._free = list(range(max_blocks - 1, -1, -1))  # free blocks without a key
        self._free_cached = []  # free blocks that keep a cached prefix
        self._refs = {}  # block in use -> how many sequences hold it
        self._high_water = 0  # max(self._refs) + 1, kept up to date: asked for every scheduling decision
        self._cached = {}  # key -> the block holding its K/V (in use or free)
        self._key_of = {}  # block -> its key in _cached
        # high_water_after answers, for as long as the blocks in use, the free lists and the mapped size
        # stay as they are: a scheduler asks the same question for every chunk size it tries.
        self._version, self._answers, self._answers_for = 0, {}, None

    @property
    def num_used(self):
        return len(self._refs)

    @property
    def high_water(self):
        """One past the highest block in use: the KV cache must map at least this many blocks."""
        return self._high_water

    def blocks_for(self, num_tokens):
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self):
        return len(self._free) + len(self._free_cached)

    def _picks(self, count, compact=False):
        """The next `count` blocks grow() hands out, in order, and how many of them are cached ones: the
        lowest free blocks, but keyless ones below what is mapped anyway (the high water, or what the KV
        cache maps) before any cached one. compact: mapped only counts below the high water, so that the
        KV cache's mapped tail can still be given back (a step that needs its room). Either list's picks
        are its lowest blocks."""
        plain, cached = _lowest(self._free, count), _lowest(self._free_cached, count)
        free_below = self.high_water if compact else max(self.high_water, self.mapped_blocks())
        first = plain[:bisect.bisect_left(plain, free_below)]
        rest = sorted(plain[len(first):] + cached)[:count - len(first)]  # the lowest of the others, either kind
        return first + rest, bisect.bisect_right(cached, rest[-1]) if rest else 0

    def least_high_water_after(self, extra_blocks):
        """A lower bound of high_water_after(extra_blocks, either way), in O(1): so many blocks in use
        reach at least that high."""
        return max(self.high_water, self.num_used + extra_blocks)

    def high_water_after(self, extra_blocks, compact=False):
        """The high water mark if extra_blocks more were allocated now by grow(..., compact) (None if there
        are not that many)."""
        if extra_blocks == 0:
            return self.high_water
        if extra_blocks > self.num_free:
            return None
        state = (self._version, self.mapped_blocks())
        if state != self._answers_for:
            self._answers, self._answers_for = {}, state
        key = (extra_blocks, compact)
        if key not in self._answers:
            self._answers[key] = max(self.high_water, max(self._picks(extra_blocks, compact)[0]) + 1)
        return self._answers[key]

    def grow(self, seq, num_tokens, compact=False):
        """Give seq enough blocks to hold num_tokens tokens (compact: see _picks)."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:  # most decodes: nothing changes, and the answers high_water_after remembers stand
            return
        if need > self.num_free:
            raise RuntimeError(f"no free KV block: {need} wanted, {self.num_free} free")
        self._version += 1
        picks, taken_cached = self._picks(need, compact)
        for block in _lowest(self._free_cached, taken_cached):  # their K/V are about to be overwritten
            del self._cached[self._key_of.pop(block)]
        del self._free[len(self._free) - (need - taken_cached):]
        del self._free_cached[len(self._free_cached) - taken_cached:]
        self._refs.update(dict.fromkeys(picks, 1))
        self._high_water = max(self._high_water, max(picks) + 1)
        seq.block_table += picks

    def free(self, seq):
        """Drop seq's blocks; those it was the last user of become free, cached ones still findable."""
        self._version += 1
        plain, cached = [], []
        for block in seq.block_table:
            self._refs[block] -= 1
            if not self._refs[block]:
                del self._refs[block]
                (cached if block in self._key_of else plain).append(block)
        _add(self._free, plain)
        _add(self._free_cached, cached)
        if self._high_water - 1 not in self._refs:
            self._high_water = max(self._refs) + 1 if self._refs else 0
        seq.block_table, seq.block_hashes = [], []

    def shared_tokens(self, seq):
        """seq's leading computed tokens in blocks that other requests hold too: they stay in the
        prefix cache when seq lets go of them."""
        shared = 0
        for block in seq.block_table:
            if self._refs.get(block, 0) < 2:
                break
            shared += 1
        return min(shared * self.block_size, seq.num_computed)

    def _key(self, seq, i):
        """Block i of seq's tokens as the cache knows it: (digest of the blocks before it, its tokens)."""
        parent = seq.block_hashes[i - 1] if i else b""
        return parent, tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])

    @staticmethod
    def _digest(key):
        """SHA-256 over the chain, not Python's hash(): a crafted prompt must not collide with another
        request's prefix and read its K/V (vLLM's CVE-2025-25183)."""
        parent, tokens = key
        return hashlib.sha256(parent + array.array("q", tokens).tobytes()).digest()

    def take_cached(self, seq):
        """On admission (seq holds no block): attach the cached blocks of seq's longest cached prefix,
        reused in place, and mark their tokens computed. The last token is left out, so the step still
        runs it and gives logits. Returns the tokens found (0 with prefix caching off)."""
        self._version += 1
        revived = set()  # free but intact blocks, back into use
        while self.prefix_caching and len(seq.block_hashes) < (len(seq) - 1) // self.block_size:
            key = self._key(seq, len(seq.block_hashes))
            block = self._cached.get(key)
            if block is None:
                break
            if block not in self._refs:
                revived.add(block)
            self._refs[block] = self._refs.get(block, 0) + 1
            self._high_water = max(self._high_water, block + 1)
            seq.block_table.append(block)
            seq.block_hashes.append(self._digest(key))
        if revived:  # one pass over the list, however many blocks came back
            self._free_cached = [b for b in self._free_cached if b not in revived]
        seq.num_computed = len(seq.block_table) * self.block_size
        return seq.num_computed

    def cache_full_blocks(self, seq):
        """After a step: make seq's blocks that are now full (all their K/V written) findable."""
        while self.prefix_caching and len(seq.block_hashes) < seq.num_computed // self.block_size:
            key = self._key(seq, len(seq.block_hashes))
            seq.block_hashes.append(self._digest(key))
            # Else another block holds these tokens already: a twin computed in the same step, or the
            # cached last block of a prompt that had to run again for its logits.
            if key not in self._cached:
                block = seq.block_table[len(seq.block_hashes) - 1]
                self._cached[key], self._key_of[block] = block, key

    def forget_unmapped(self, num_blocks):
        """The KV cache now maps only the blocks below num_blocks: those above lost their K/V. (None
        of them is in use: the cache always maps the high water.) Dropping their keys here, rather than
        checking the mapped size on a hit, also covers a block unmapped and mapped again since."""
        self._version += 1
        lost = {b for b in self._key_of if b >= num_blocks}
        for block in lost:
            del self._cached[self._key_of.pop(block)]
        if lost:  # free ones among them are plain free blocks now
            _add(self._free, [b for b in self._free_cached if b in lost])
            self._free_cached = [b for b in self._free_cached if b not in lost]
