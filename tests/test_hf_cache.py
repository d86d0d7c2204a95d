"""ElasticCache against transformers' DynamicCache: same tokens, memory that follows the tokens."""
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import torch_ellm
from torch_ellm import Pool
from torch_ellm.integrations.hf import ElasticCache, _cache_kwarg, generate

CHUNK = 16 << 10  # small chunks so that 200+ tokens cross many of them


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Both caches run under the same settings, so one thread changes no result; it keeps the tests
    fast on a small shared machine, where a second OpenMP thread spins against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama(device="cpu"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval().to(device)


def gpt2(device="cpu"):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval().to(device)


def padded_batch(device="cpu"):
    """Three prompts of 12, 8 and 5 tokens, left-padded."""
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (3, 12), device=device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def both(model, pool, seed=None, **kwargs):
    """(DynamicCache ids, ElasticCache ids) of the same generate call."""
    if seed is not None:
        torch.manual_seed(seed)
    reference = model.generate(**kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    return reference, generate(model, pool=pool, **kwargs)


def kv_bytes(pool):
    return pool.stats()["bytes_by_tag"]["kv"]["device_bytes"]


def test_smollm2_greedy_matches_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    pool = Pool("host", chunk_bytes=64 << 10)
    reference, ids = both(model, pool, **inputs, max_new_tokens=24, do_sample=False)
    assert torch.equal(ids, reference)
    assert "Paris" in tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:])
    assert pool.stats()["device_peak_bytes"] > 0 and pool.stats()["device_bytes"] == 0


@pytest.mark.parametrize("make_model", [llama, gpt2])
def test_long_padded_greedy_matches_dynamic_cache(make_model):
    model = make_model()
    pool = Pool("host", chunk_bytes=CHUNK)
    reference, ids = both(model, pool, **padded_batch(), max_new_tokens=220, min_new_tokens=220, do_sample=False)
    assert ids.shape == (3, 232)
    assert torch.equal(ids, reference)
    # 232 tokens x 3 sequences span several chunks per tensor.
    layers = model.config.num_hidden_layers
    assert pool.stats()["device_peak_bytes"] >= 2 * layers * 4 * CHUNK
    assert pool.stats()["device_bytes"] == 0


@pytest.mark.parametrize("make_model", [llama, gpt2])
def test_sampling_with_seed_matches_dynamic_cache(make_model):
    model = make_model()
    reference, ids = both(model, Pool("host", chunk_bytes=CHUNK), seed=7, **padded_batch(), max_new_tokens=60,
                          min_new_tokens=60, do_sample=True, top_k=20, temperature=0.8)
    assert torch.equal(ids, reference)


@pytest.mark.parametrize("make_model", [llama, gpt2])
def test_beam_search_matches_dynamic_cache_and_reorders_in_place(make_model):
    model = make_model()
    kwargs = dict(padded_batch(), max_new_tokens=40, min_new_tokens=40, num_beams=3, do_sample=False)
    reference = model.generate(**kwargs)
    cache = ElasticCache(model.config, max_cache_len=52, pool=Pool("host", chunk_bytes=CHUNK))
    ids = model.generate(**kwargs, **{_cache_kwarg(model): cache})
    assert torch.equal(ids, reference)
    assert cache.batch_size == 9
    # After 40 reorders the keys attention reads are still the bytes of the virtual tensor.
    assert cache.layers[0].keys.data_ptr() == cache.layers[0].k.store.data_ptr()
    cache.release()


@torch.no_grad()
def test_mapped_bytes_follow_sequence_length():
    model = llama()
    pool = Pool("host", chunk_bytes=CHUNK)
    cache = ElasticCache(model.config, max_cache_len=300, pool=pool)
    step = {_cache_kwarg(model): cache, "use_cache": True}
    inputs = padded_batch()
    logits = model(**inputs, **step).logits
    mask = inputs["attention_mask"]
    row_bytes = 3 * model.config.num_key_value_heads * 16 * 4  # batch x heads x head_dim x fp32
    for _ in range(250):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        logits = model(input_ids=logits[:, -1:].argmax(-1), attention_mask=mask, **step).logits
        live = cache.get_seq_length() * row_bytes
        for layer in cache.layers:
            for rows in (layer.k, layer.v):
                assert live <= rows.mapped < live + CHUNK
                assert rows.store.mapped_bytes == rows.mapped
        assert kv_bytes(pool) == cache.mapped_bytes()
    assert cache.get_seq_length() == 262
    cache.release()
    assert pool.stats()["device_bytes"] == 0 and kv_bytes(pool) == 0


def test_crop_keeps_chunks_until_the_pool_asks_for_them():
    model = llama()
    pool = Pool("host", chunk_bytes=CHUNK)
    cache = ElasticCache(model.config, max_cache_len=300, pool=pool)
    model.generate(**padded_batch(), max_new_tokens=200, min_new_tokens=200, do_sample=False,
                   **{_cache_kwarg(model): cache})
    full = cache.mapped_bytes()
    key_prefix = cache.layers[1].keys[:, :, :100].clone()
    cache.crop(-(cache.get_seq_length() - 100))
    assert cache.get_seq_length() == 100 and cache.mapped_bytes() == full
    # A budget that fits only the live tokens makes the pool shrink its consumers: the cache gives
    # back the cropped tail (there is no host budget to borrow from).
    tensors = 2 * len(cache.layers)
    needed = tensors * math.ceil(100 * cache.layers[0].k.row_bytes / CHUNK) * CHUNK
    assert needed < full
    pool.set_budget(needed)
    assert cache.mapped_bytes() == needed and pool.borrowed_bytes == 0
    assert torch.equal(cache.layers[1].keys, key_prefix)
    cache.release()
    assert pool.stats()["device_bytes"] == 0


def test_over_budget_generation_borrows_host_memory_and_matches():
    model = llama()
    kwargs = dict(padded_batch(), max_new_tokens=220, min_new_tokens=220, do_sample=False)
    reference = model.generate(**kwargs)
    # The run needs 24 chunks of kv: give the device 12 and let the pool borrow the rest.
    pool = Pool("host", chunk_bytes=CHUNK, budget_bytes=12 * CHUNK, host_budget_bytes=64 * CHUNK)
    cache = ElasticCache(model.config, max_cache_len=232, pool=pool)
    ids = model.generate(**kwargs, **{_cache_kwarg(model): cache})
    assert torch.equal(ids, reference)
    stats = pool.stats()
    assert stats["borrowed_bytes"] > 0 and stats["device_peak_bytes"] <= 12 * CHUNK
    keys = cache.layers[0].keys.clone()
    pool.set_budget(64 * CHUNK)
    assert cache.return_borrowed() > 0 and pool.borrowed_bytes == 0
    assert torch.equal(cache.layers[0].keys, keys)  # the bytes came back at the same address
    cache.release()
    assert pool.stats()["device_bytes"] == 0 and pool.borrowed_bytes == 0


def test_over_budget_without_host_memory_raises_and_releases():
    model = llama()
    pool = Pool("host", chunk_bytes=CHUNK, budget_bytes=8 * CHUNK)
    with pytest.raises(torch_ellm.OutOfMemoryError):
        generate(model, pool=pool, **padded_batch(), max_new_tokens=220, min_new_tokens=220, do_sample=False)
    assert pool.stats()["device_bytes"] == 0
    _, ids = both(model, pool, **padded_batch(), max_new_tokens=20, do_sample=False)  # the pool still works
    assert ids.shape[1] > 12


def test_budgets_under_enable_are_refused(monkeypatch):
    """Under enable() GPU layers take the allocator's pool: its own budgets would split the GPU in two."""
    monkeypatch.setattr(torch_ellm.allocator, "is_enabled", lambda: True)
    cache = ElasticCache(LlamaConfig(num_hidden_layers=1), 64, budget_bytes=1 << 20)
    with pytest.raises(ValueError, match="allocator's pool"):
        cache.pool_for(torch.device("cuda", 0))


def test_cache_keyword_follows_the_installed_transformers():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert _cache_kwarg(Old()) == "past_key_values"
    assert _cache_kwarg(llama()) == "cache"


@pytest.mark.gpu
@pytest.mark.parametrize("make_model", [llama, gpt2])
def test_cuda_greedy_and_sampling_match_dynamic_cache(make_model):
    model = make_model("cuda")
    pool = Pool("cuda", device=0, chunk_bytes=2 << 20)
    reference, ids = both(model, pool, **padded_batch("cuda"), max_new_tokens=220, min_new_tokens=220,
                          do_sample=False)
    assert torch.equal(ids, reference)
    reference, ids = both(model, pool, seed=3, **padded_batch("cuda"), max_new_tokens=60, do_sample=True)
    assert torch.equal(ids, reference)
    assert pool.stats()["device_bytes"] == 0


@pytest.mark.gpu
def test_cuda_over_budget_borrows_host_memory_and_matches():
    model = llama("cuda")
    kwargs = dict(padded_batch("cuda"), max_new_tokens=220, min_new_tokens=220, do_sample=False)
    reference = model.generate(**kwargs)
    # Four tensors of one chunk each on a device budget of two chunks: two are borrowed.
    chunk = 2 << 20
    pool = Pool("cuda", device=0, chunk_bytes=chunk, budget_bytes=2 * chunk, host_budget_bytes=8 * chunk)
    cache = ElasticCache(model.config, max_cache_len=232, pool=pool)
    ids = model.generate(**kwargs, **{_cache_kwarg(model): cache})
    assert torch.equal(ids, reference)
    assert pool.stats()["borrowed_peak_bytes"] > 0
    cache.release()
    assert pool.stats()["device_bytes"] == 0


@pytest.mark.gpu
def test_device_map_puts_each_layer_cache_on_its_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    model = llama()
    from accelerate import dispatch_model

    model = dispatch_model(model, device_map={"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
                                              "model.norm": 1, "model.rotary_emb": 0, "lm_head": 1})
    cache = ElasticCache(model.config, max_cache_len=100)
    model.generate(**padded_batch("cuda:0"), max_new_tokens=20, do_sample=False, **{_cache_kwarg(model): cache})
    assert [layer.device.index for layer in cache.layers] == [0, 1]
    assert {device.index for device in cache.pools} == {0, 1}
    cache.release()
