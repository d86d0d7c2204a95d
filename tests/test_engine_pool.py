"""The engine on a pool it shares: a given Pool with other tensors in it, and activations that come
from the pool itself (CUDA under enable(); on CPU the same accounting runs with nothing routed)."""
import pytest
import torch

import torch_ellm
from test_engine import GREEDY, MB, PROMPTS, one_thread, reference, smollm2_engine  # noqa: F401


def shared_pool():
    return torch_ellm.Pool("host", budget_bytes=64 * MB, chunk_bytes=64 << 10)


def test_engine_draws_from_a_given_pool_beside_other_tensors(smollm2, reference):
    pool = shared_pool()
    other = pool.virtual_tensor(8 * MB, tag="weights")
    other.resize(8 * MB)
    data = torch.randint(0, 256, (8 * MB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    other.as_tensor(8 * MB, torch.uint8).copy_(data)
    llm = smollm2_engine(smollm2, mode="elastic", pool=pool)
    assert llm.pool is pool
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert max(s["device_bytes"] for s in llm.metrics.steps) <= pool.budget_bytes
    llm.close()
    assert torch.equal(other.as_tensor(8 * MB, torch.uint8), data)
    assert pool.stats()["mapped_device_bytes"] == 8 * MB  # the engine gave back all it took


@pytest.mark.parametrize("setting", [dict(budget_bytes=32 * MB), dict(chunk_bytes=64 << 10)])
def test_budgets_and_chunk_size_come_from_a_given_pool(smollm2, setting):
    with pytest.raises(ValueError, match="come from the pool"):
        smollm2_engine(smollm2, pool=shared_pool(), **setting)


@pytest.mark.parametrize("mode", ["static", "elastic"])
def test_activations_in_pool_are_kept_free_of_kv_not_charged(smollm2, reference, mode):
    pool = shared_pool()
    llm = smollm2_engine(smollm2, mode=mode, pool=pool, activations_in_pool=True)
    peak = llm.memory.peak_activation_bytes
    assert pool.policy["keep_free_bytes"] == (peak if mode == "static" else 0)
    ids = [llm.add_request(p, GREEDY) for p in PROMPTS]
    outputs, most_kept = {}, 0
    while llm.has_unfinished_requests():
        for out in llm.step():
            outputs[out.request_id] = out.token_ids
        keep = pool.policy["keep_free_bytes"]
        assert keep <= peak and (keep == peak or mode == "elastic")
        assert llm.kv_cache.device_bytes + keep <= pool.budget_bytes
        assert llm.memory.activations.mapped_bytes == 0  # nothing charged
        most_kept = max(most_kept, keep)
    assert most_kept > 0
    assert [outputs[i] for i in ids] == reference
    assert max(s["activation_bytes"] for s in llm.metrics.steps) == 0
    llm.close()
    assert pool.policy["keep_free_bytes"] == 0 and pool.stats()["mapped_device_bytes"] == 0
