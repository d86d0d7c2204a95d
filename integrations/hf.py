"""Hugging Face generate on an elastic KV cache.

ElasticCache is a transformers Cache whose layers keep keys and values in VirtualTensors. Each
tensor reserves address space for the longest sequence once and maps chunks only as tokens
arrive; new tokens are written in place. So memory follows the live tokens (StaticCache maps the
maximum up front) and no step copies the whole cache (DynamicCache concatenates every step and
briefly holds the cache twice).

Layout: one VirtualTensor per key or value of a layer, time-major [max_len, batch, heads, dim].
Growth is at the end of the address range, so a new token is a new row; attention gets the
permuted view [batch, heads, length, dim], whose last dim stays contiguous as SDPA wants.

    from torch_ellm.integrations.hf import ElasticCache, generate
    out = generate(model, input_ids=ids, max_new_tokens=200)            # builds and frees the cache
    out = model.generate(input_ids=ids, cache=ElasticCache(model.config))  # transformers 5.24+
"""
import inspect
import math
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import allocator
from ..pool import Pool


class TokenRows:
    """One key or value tensor of a layer: a row of [batch, heads, dim] per token, in a VirtualTensor
    reserved for max_len rows. Appending maps chunks at the end; no byte ever moves."""

    def __init__(self, pool, max_len, row_shape, dtype):
        self.row_shape, self.dtype, self.max_len = tuple(row_shape), dtype, max_len
        self.row_bytes = math.prod(row_shape) * dtype.itemsize
        self.chunk = pool.chunk_bytes
        self.store = pool.virtual_tensor(max_len * self.row_bytes, tag="kv")
        # Mapped bytes are tracked here, not read from the store: a pool callback may run while the
        # store is locked by its own growth, and reading it then would raise.
        self.mapped = 0
        self.rows = self.store.as_tensor([0, *self.row_shape], dtype)  # view over every mapped row

    @property
    def capacity(self):
        return self.rows.shape[0]

    def resize(self, length, wait=True):
        """Map exactly the chunks that `length` rows need (growing or shrinking); views are renewed.
        With wait=False (pool callbacks), a store another thread holds is left as it is."""
        if length > self.max_len:
            raise ValueError(f"the cache holds at most {self.max_len} tokens; raise max_cache_len")
        self.rows = None  # a live view would forbid the shrink; growth never moves mapped bytes anyway
        try:
            nbytes = length * self.row_bytes
            if wait:
                self.store.resize(nbytes)
            elif not self.store.try_resize(nbytes):
                return
            self.mapped = math.ceil(length * self.row_bytes / self.chunk) * self.chunk
        finally:
            capacity = min(self.mapped // self.row_bytes, self.max_len)
            self.rows = self.store.as_tensor([capacity, *self.row_shape], self.dtype)

    def spare_bytes(self, length):
        """Mapped bytes past the chunk holding row `length`: what a trim would give back."""
        return self.mapped - math.ceil(length * self.row_bytes / self.chunk) * self.chunk

    def write(self, start, states):
        """states: [batch, heads, n, dim] written as rows start .. start+n."""
        if start + states.shape[2] > self.capacity:
            self.resize(start + states.shape[2])
        self.rows[start:start + states.shape[2]].copy_(states.permute(2, 0, 1, 3))

    def view(self, length):
        """[batch, heads, length, dim] over the first `length` rows, no copy."""
        return self.rows[:length].permute(1, 2, 0, 3)

    def reorder(self, length, index):
        """rows[:length] = rows[:length, index] in place, a chunk of rows at a time so that the
        temporary stays one chunk (index_select of the whole cache would hold it twice)."""
        step = max(1, self.chunk // self.row_bytes)
        for start in range(0, length, step):
            part = self.rows[start:start + step][:length - start]
            part.copy_(part.index_select(1, index))

    def release(self):
        self.rows = None
        self.store.release()
        self.mapped = 0


class ElasticLayer(CacheLayerMixin):
    """The cache of one attention layer: keys and values as TokenRows on the pool of the layer's device."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, cache, max_len):
        super().__init__()
        self.cache, self.max_len = cache, max_len
        self.length = 0
        self.k = self.v = None
        self.busy = False  # inside update: a pool callback must not trim this layer then

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        pool = self.cache.pool_for(self.device)
        batch, heads = key_states.shape[:2]
        self.batch_size = batch
        self.k = TokenRows(pool, self.max_len, (batch, heads, key_states.shape[-1]), key_states.dtype)
        self.v = TokenRows(pool, self.max_len, (batch, heads, value_states.shape[-1]), value_states.dtype)
        self.is_initialized = True

    def _refresh(self):
        """Point keys/values at the live prefix (they are views, so they keep their bytes mapped)."""
        self.keys, self.values = self.k.view(self.length), self.v.view(self.length)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.busy = True
        try:
            self.k.write(self.length, key_states)
            self.v.write(self.length, value_states)
        finally:
            self.busy = False
        self.length += key_states.shape[2]
        self._refresh()
        return self.keys, self.values

    def get_mask_sizes(self, query_length):
        # older transformers (4.5x) pass cache_position, one entry per query token, instead of a count
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def get_seq_length(self):
        return self.length

    def get_max_length(self):
        return self.max_len

    def crop(self, tokens_to_remove):
        """Forget the last tokens (negative count, as DynamicLayer takes it). Their chunks stay mapped
        for the tokens that will replace them; the pool gets them back through trim() under pressure."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._refresh()

    def reorder_cache(self, beam_idx):
        if self.length:
            self.k.reorder(self.length, beam_idx.to(self.device))
            self.v.reorder(self.length, beam_idx.to(self.device))

    def spare_bytes(self):
        return self.k.spare_bytes(self.length) + self.v.spare_bytes(self.length) if self.is_initialized else 0

    def trim(self):
        """Unmap the chunks past the live tokens; returns bytes freed."""
        if self.busy or not self.spare_bytes():
            return 0
        before = self.k.mapped + self.v.mapped
        self.keys = self.values = None
        try:
            self.k.resize(self.length, wait=False)  # a pool callback: never wait on another thread
            self.v.resize(self.length, wait=False)
        finally:
            self._refresh()
        return before - self.k.mapped - self.v.mapped

    def mapped_bytes(self):
        return self.k.mapped + self.v.mapped if self.is_initialized else 0

    def release(self):
        """Give every chunk and the address range back; the layer starts over at the next update."""
        if self.is_initialized:
            self.keys = self.values = None
            self.k.release()
            self.v.release()
            self.k = self.v = None
        self.length = 0
        self.is_initialized = False

    def reset(self):
        self.release()


class ElasticCache(Cache):
    """A transformers Cache on virtual tensors: memory follows the live tokens, appends are in place.

    config: the model config (its decoder part gives the number of layers).
    max_cache_len: tokens each layer reserves address space for (default: the model's
        max_position_embeddings); only the tokens written are ever mapped.
    pool: a Pool, or a list of Pools, one per device; layers on a device without one get a new
        pool (host backend for CPU, cuda backend for a GPU) built with budget_bytes,
        host_budget_bytes and chunk_bytes, except on a GPU under torch_ellm.enable(): there they
        take the allocator's pool, so that cache, weights and activations share one budget (set
        by enable()). With accelerate's device_map each layer's cache lives on its own layer's
        device.
    Under memory pressure a pool asks the cache to unmap the chunks past its live tokens (after
    crop); with host_budget_bytes > 0 the pool moves cold prefix chunks to host memory at the same
    address and return_borrowed() brings them back.
    """

    def __init__(self, config, max_cache_len=None, pool=None, budget_bytes=None, host_budget_bytes=0,
                 chunk_bytes=None):
        text = config.get_text_config(decoder=True)
        if max_cache_len is None:
            max_cache_len = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions")
        self.pool_kwargs = {"budget_bytes": budget_bytes, "host_budget_bytes": host_budget_bytes,
                            "chunk_bytes": chunk_bytes}
        pools = [pool] if isinstance(pool, Pool) else list(pool or [])
        self.pools = {p.device: p for p in pools}
        self.consumers = {}  # device -> consumer id in that pool
        super().__init__(layers=[ElasticLayer(self, max_cache_len) for _ in range(text.num_hidden_layers)])

    def pool_for(self, device):
        """The pool of a device, made on first use, with this cache registered as an elastic consumer."""
        if device not in self.pools:
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"ElasticCache runs on cpu or cuda, not {device}")
            if device.type == "cuda" and allocator.is_enabled():
                if any(self.pool_kwargs.values()):
                    raise ValueError("under torch_ellm.enable() the cache takes the allocator's pool, whose budgets "
                                     "enable() sets: leave budget_bytes, host_budget_bytes and chunk_bytes out")
                self.pools[device] = allocator.pool(device)
            else:
                backend = "host" if device.type == "cpu" else "cuda"
                self.pools[device] = Pool(backend, device.index or 0, **self.pool_kwargs)
        pool = self.pools[device]
        if device not in self.consumers:
            me = weakref.ref(self)  # the pool must not keep a forgotten cache alive
            self.consumers[device] = pool.add_consumer(
                f"ElasticCache@{id(self):x}", lambda want: me()._shrink(device, want) if me() else 0,
                lambda: me()._spare_on(device) if me() else 0)
        return pool

    def _layers_on(self, device):
        return [layer for layer in self.layers if layer.is_initialized and layer.device == device]

    def _spare_on(self, device):
        return sum(layer.spare_bytes() for layer in self._layers_on(device))

    def _shrink(self, device, want):
        """Pool callback: trim layers on `device` until `want` bytes are free. It must not raise into
        the pool; a layer that cannot shrink now (its own growth asked, or a view is held) is skipped."""
        freed = 0
        for layer in self._layers_on(device):
            if freed >= want:
                break
            try:
                freed += layer.trim()
            except Exception:
                continue
        return freed

    def trim(self):
        """Unmap every chunk past the live tokens now; returns bytes freed."""
        return sum(layer.trim() for layer in self.layers)

    def mapped_bytes(self):
        """Bytes of keys and values mapped (device or borrowed host)."""
        return sum(layer.mapped_bytes() for layer in self.layers)

    def return_borrowed(self):
        """Bring chunks borrowed to host memory back to their devices while budgets allow."""
        return sum(pool.return_borrowed() for pool in self.pools.values())

    def release(self):
        """Unmap everything and leave the pools; the cache can be filled again afterwards."""
        for layer in self.layers:
            layer.release()
        for device, consumer in self.consumers.items():
            self.pools[device].remove_consumer(consumer)
        self.consumers = {}


def _cache_kwarg(model):
    """transformers 5.24 renamed past_key_values to cache (and warns on the old name); 5.17 knows only
    past_key_values. The model's forward signature says which one this install speaks."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _max_cache_len(model, generate_kwargs):
    """Tokens the cache must hold: prompt plus new tokens, as generate will count them."""
    config = generate_kwargs.get("generation_config") or model.generation_config
    prompt = generate_kwargs.get("input_ids", generate_kwargs.get("inputs"))
    prompt_len = prompt.shape[-1] if prompt is not None else generate_kwargs["inputs_embeds"].shape[1]
    new_tokens = generate_kwargs.get("max_new_tokens", config.max_new_tokens)
    if new_tokens is not None:
        return prompt_len + new_tokens
    return max(generate_kwargs.get("max_length", config.max_length), prompt_len + 1)


def generate(model, pool=None, budget_bytes=None, host_budget_bytes=0, **generate_kwargs):
    """model.generate(**generate_kwargs) on an ElasticCache sized from the model config and the
    requested length. The cache is released before returning, unless return_dict_in_generate=True
    (then the output carries it: call its release() when done)."""
    cache = ElasticCache(model.config, _max_cache_len(model, generate_kwargs), pool=pool,
                         budget_bytes=budget_bytes, host_budget_bytes=host_budget_bytes)
    keep = generate_kwargs.get("return_dict_in_generate", False)
    try:
        return model.generate(**generate_kwargs, **{_cache_kwarg(model): cache})
    finally:
        if not keep:
            cache.release()
