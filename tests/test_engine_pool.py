"""The engine on a pool it shares: a given Pool with other tensors in it, and room kept in it for the
activations (they come from the pool itself on CUDA under enable(); on CPU the same room is kept with
nothing routed into it)."""
import pytest
import torch

import torch_ellm
from torch_ellm.integrations.engine.llm import LLM
from torch_ellm.integrations.engine.memory import host_read_seconds
from torch_ellm.integrations.engine.sampling_params import SamplingParams
from test_engine import GREEDY, MB, PROMPTS, one_thread, reference, small_llama, smollm2_engine  # noqa: F401


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
def test_activations_are_kept_room_for_never_mapped(smollm2, reference, mode):
    pool = shared_pool()
    llm = smollm2_engine(smollm2, mode=mode, pool=pool)
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
        assert pool.bytes_by_tag()["activations"]["device_bytes"] == 0  # the engine maps no stand-in
        most_kept = max(most_kept, keep)
    assert most_kept > 0
    assert [outputs[i] for i in ids] == reference
    assert 0 < max(s["activation_bytes"] for s in llm.metrics.steps) <= peak  # the room each step kept
    llm.close()
    assert pool.policy["keep_free_bytes"] == 0 and pool.stats()["mapped_device_bytes"] == 0


def test_requests_that_other_tenants_leave_no_room_for_are_refused_or_wait(smollm2, reference):
    pool = shared_pool()
    other = pool.virtual_tensor(62 * MB, tag="weights")
    llm = smollm2_engine(smollm2, mode="elastic", pool=pool)
    other.resize(62 * MB)
    with pytest.raises(ValueError, match="held by the pool's other tenants"):
        llm.add_request(PROMPTS[0], GREEDY)
    other.resize(0)
    first = llm.add_request(PROMPTS[0], GREEDY)
    other.resize(62 * MB)  # the tenant grows after admission: the request waits, nothing is lost
    with pytest.raises(torch.OutOfMemoryError, match="requests stay queued"):
        llm.step()
    other.resize(8 * MB)
    rest = [llm.add_request(p, GREEDY) for p in PROMPTS[1:]]
    outputs = {}
    while llm.has_unfinished_requests():
        outputs.update((o.request_id, o.token_ids) for o in llm.step())
    assert [outputs[i] for i in [first] + rest] == reference
    assert max(s["device_bytes"] for s in llm.metrics.steps) <= pool.budget_bytes
    llm.close()
    assert pool.stats()["mapped_device_bytes"] == 8 * MB


def test_static_mode_refuses_a_pool_whose_tenants_leave_no_room_for_activations(smollm2):
    pool = shared_pool()
    other = pool.virtual_tensor(63 * MB + (512 << 10), tag="weights")
    other.resize(63 * MB + (512 << 10))
    with pytest.raises(ValueError, match="other tenants"):
        smollm2_engine(smollm2, mode="static", pool=pool)
    assert pool.stats()["mapped_device_bytes"] == other.mapped_bytes  # the failed engine left nothing


@pytest.mark.parametrize("mode", ["static", "elastic"])
def test_keep_free_bytes_preset_on_the_pool_stays_free_of_the_engine(smollm2, reference, mode):
    pool = shared_pool()
    kept = 58 * MB  # leaves less than the 8.5 MB this batch maps in elastic mode with the whole pool
    pool.set_policy(keep_free_bytes=kept)
    llm = smollm2_engine(smollm2, mode=mode, pool=pool)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert max(s["device_bytes"] for s in llm.metrics.steps) <= pool.budget_bytes - kept
    llm.close()
    assert pool.policy["keep_free_bytes"] == kept and pool.stats()["mapped_device_bytes"] == 0


def test_borrowing_moves_kv_before_the_step_grows_it():
    """The KV layer being grown lends none of its own chunks, and keep_free shuts the KV out of the
    step's room for activations: a step that fits only by borrowing must borrow before either happens."""
    model, chunk = small_llama(512), 64 << 10
    pool = torch_ellm.Pool("host", budget_bytes=7 * chunk, host_budget_bytes=4 * chunk, chunk_bytes=chunk)
    llm = LLM(model, pool=pool, mode="elastic", preemption="borrow", block_size=16, max_num_batched_tokens=64,
              max_model_len=512)
    prompts = [[i % 128 for i in range(256)], [(7 + i) % 128 for i in range(288)]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for n in (32, 1)]
    outputs = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.metrics.summary()["peak_borrowed_bytes"] > 0
    llm.close()
    assert pool.stats()["mapped_device_bytes"] == 0 and pool.borrowed_bytes == 0
    roomy = LLM(model, pool=torch_ellm.Pool("host", budget_bytes=64 * chunk, chunk_bytes=chunk), mode="elastic",
                block_size=16, max_num_batched_tokens=64, max_model_len=512)  # no borrowing: the same tokens
    assert [o.token_ids for o in roomy.generate(prompts, params, use_tqdm=False)] == outputs
    roomy.close()
    assert [len(tokens) for tokens in outputs] == [32, 1]


def test_the_cost_model_is_told_the_kv_each_step_read_in_host_memory():
    model, chunk = small_llama(512), 64 << 10
    pool = torch_ellm.Pool("host", budget_bytes=7 * chunk, host_budget_bytes=4 * chunk, chunk_bytes=chunk)
    llm = LLM(model, pool=pool, mode="elastic", preemption="borrow", block_size=16, max_num_batched_tokens=64,
              max_model_len=512)
    seen, observe = [], llm.cost.observe
    llm.cost.observe = lambda work, seconds: seen.append(work.borrowed) or observe(work, seconds)
    prompts = [[i % 128 for i in range(256)], [(7 + i) % 128 for i in range(288)]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for n in (32, 1)]
    llm.generate(prompts, params, use_tqdm=False)
    # The KV is the pool's only borrowable tenant: each step's borrowed bytes are its KV's.
    assert max(seen) == llm.metrics.summary()["peak_borrowed_bytes"] > 0 and min(seen) == 0
    llm.close()


@pytest.mark.parametrize("prefill_first", [False, True])
def test_a_request_crowded_out_while_running_alone_waits_instead_of_preempting_itself_for_ever(prefill_first):
    """A tenant grows while one request decodes; its next block no longer fits even alone. It preempts
    itself once; prefilling again it gets stuck at the same length, where doing so again would loop for
    ever: step() raises, and once the tenant shrinks the request goes on from where it was. Prefilling
    first, the decode pass that preempted it readmits it in the same step, as the default one does."""
    model, chunk = small_llama(512), 64 << 10
    prompt, params = [i % 128 for i in range(95)], SamplingParams(max_tokens=165, ignore_eos=True, temperature=0)
    outputs = []
    for crowd in (False, True):
        pool = torch_ellm.Pool("host", budget_bytes=5 * chunk, host_budget_bytes=23 * chunk, chunk_bytes=chunk)
        llm = LLM(model, pool=pool, mode="elastic", preemption="borrow", block_size=16,
                  max_num_batched_tokens=128, max_model_len=512, prefill_first=prefill_first)
        request_id = llm.add_request(prompt, params)
        tenant = pool.virtual_tensor(chunk, tag="other")
        tokens, steps = [], 0
        while llm.has_unfinished_requests():
            if crowd and steps == 3:
                tenant.resize(chunk)
            try:
                tokens += [t for o in llm.step() for t in o.new_token_ids]
            except torch.OutOfMemoryError as e:
                assert crowd and "stay queued" in str(e) and "other tenants" in str(e)
                assert llm.scheduler.num_preemptions == 1 and 256 <= len(llm.scheduler.running[0]) <= 257
                tenant.resize(0)
            steps += 1
        assert len(llm.metrics.requests) == 1 and llm.metrics.requests[0]["preemptions"] == crowd  # once, not for ever
        outputs.append(tokens)
        tenant.release()
        llm.close()
        assert pool.stats()["mapped_device_bytes"] == 0 and request_id == 0
    assert outputs[0] == outputs[1] and len(outputs[0]) == 165


def test_static_kv_the_pool_borrowed_for_a_later_tenant_still_serves():
    """A tenant made after a static engine pushes part of its fixed KV pool to host memory: requests are
    still accepted (that KV is read in place) and come out as without the tenant."""
    model, chunk = small_llama(512), 64 << 10
    prompt, params = [i % 128 for i in range(20)], SamplingParams(max_tokens=10, ignore_eos=True, temperature=0)
    outputs = []
    for tenant_chunks in (0, 4):
        pool = torch_ellm.Pool("host", budget_bytes=12 * chunk, host_budget_bytes=12 * chunk, chunk_bytes=chunk)
        llm = LLM(model, pool=pool, mode="static", block_size=8, max_num_batched_tokens=16, max_model_len=256)
        tenant = pool.virtual_tensor(4 * chunk, tag="other")
        tenant.resize(tenant_chunks * chunk)
        assert (llm.kv_cache.host_bytes > 0) == bool(tenant_chunks)
        outputs.append(llm.generate([prompt], params, use_tqdm=False)[0].token_ids)
        llm.close()
        tenant.release()
    assert outputs[0] == outputs[1] and len(outputs[0]) == 10


def test_kv_on_chunks_that_held_nan_decodes_as_on_clean_ones():
    """Pool chunks come back with a former tenant's bytes. Decodes read whole blocks and mask the slots
    past each context; a NaN there would still poison the sum, so new KV memory is zeroed."""
    model, chunk = small_llama(512), 64 << 10
    prompt, params = [(3 * i + 1) % 128 for i in range(21)], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0)
    outputs = []
    for poison in (False, True):
        pool = torch_ellm.Pool("host", budget_bytes=16 * chunk, chunk_bytes=chunk)
        tenant = pool.virtual_tensor(16 * chunk, tag="other")
        tenant.resize(16 * chunk * poison)
        tenant.as_tensor(16 * chunk * poison // 4, torch.float32).fill_(float("nan"))
        tenant.release()
        llm = LLM(model, pool=pool, block_size=16, max_num_batched_tokens=64, max_model_len=256)
        outputs.append(llm.generate([prompt, prompt[:5]], params, use_tqdm=False))
        llm.close()
    assert [o.token_ids for o in outputs[0]] == [o.token_ids for o in outputs[1]]


def test_static_growth_past_the_fixed_pool_needs_device_room_beside_the_activation_peak():
    """A tenant and a keep_free preset leave no device room beside the static activation peak: the fixed
    KV pool (partly in host memory) still serves, but a request needing blocks past it is refused up front
    instead of being accepted and never finishing."""
    model, chunk = small_llama(512), 64 << 10
    pool = torch_ellm.Pool("host", budget_bytes=10 * chunk, host_budget_bytes=21 * chunk, chunk_bytes=chunk)
    pool.set_policy(keep_free_bytes=3 * chunk)
    llm = LLM(model, pool=pool, mode="static", preemption="borrow", block_size=16,
              max_num_batched_tokens=32, max_model_len=512)
    tenant = pool.virtual_tensor(3 * chunk, tag="other")
    tenant.resize(3 * chunk)
    assert llm.kv_cache.host_bytes > 0 and llm.memory.max_blocks_alone() == llm.memory.static_blocks
    fixed_tokens = llm.memory.static_blocks * 16
    with pytest.raises(ValueError, match="holds at most"):
        llm.add_request(list(range(100)), SamplingParams(max_tokens=fixed_tokens, ignore_eos=True))
    out = llm.generate([list(range(100))], SamplingParams(max_tokens=fixed_tokens - 100, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.token_ids) == fixed_tokens - 100
    llm.close()
    tenant.release()


def test_a_lone_request_may_borrow_the_whole_host_budget_whatever_the_slo_policy_shrank_it_to():
    """TPOT breaches halve the SLO policy's logical host buffer. That limits borrowing to run others beside
    a request; alone, a request that add_request accepted on the whole host budget must still finish."""
    chunk = 64 << 10
    pool = torch_ellm.Pool("host", budget_bytes=5 * chunk, host_budget_bytes=32 * chunk, chunk_bytes=chunk)
    llm = LLM(small_llama(512), pool=pool, mode="elastic", policy="slo", preemption="borrow", block_size=16,
              max_num_batched_tokens=32, max_model_len=512)
    params = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)
    llm.add_request(list(range(60)), params, tpot_slo=1e-6)  # every step breaches it
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.scheduler.policy.host_buffer < pool.host_budget_bytes // 8
    assert llm.metrics.summary()["peak_borrowed_bytes"] > 0 and len(llm.metrics.requests) == 1
    llm.close()
    assert pool.borrowed_bytes == 0


def test_only_a_request_alone_borrows_past_the_slo_policys_host_buffer():
    chunk = 64 << 10
    pool = torch_ellm.Pool("host", budget_bytes=32 * chunk, host_budget_bytes=32 * chunk, chunk_bytes=chunk)
    llm = LLM(small_llama(512), pool=pool, mode="elastic", policy="slo", preemption="borrow", block_size=16,
              max_num_batched_tokens=64, max_model_len=512)
    llm.scheduler.policy.host_buffer = chunk
    first, second = (llm.add_request(list(range(20)), SamplingParams(max_tokens=8)) for _ in range(2))
    llm.step()
    a, b = (llm._requests[i] for i in (first, second))
    assert llm.scheduler.running == [a, b]
    assert llm.scheduler._allowance(a) == llm.scheduler._allowance(b) == chunk  # side by side: the buffer
    llm.abort(second)
    assert llm.scheduler._allowance(a) == 32 * chunk  # alone: the whole host budget
    assert llm.scheduler._allowance(b) == chunk  # admitted beside a: the buffer
    llm.close()


def test_engines_sharing_a_pool_each_add_and_take_back_only_their_own_room(smollm2, reference):
    """keep_free_bytes is the pool's: a caller's setting made after an engine exists, and one engine's
    room, survive the other engine's steps, idling and closing."""
    pool = shared_pool()
    first = smollm2_engine(smollm2, mode="elastic", pool=pool)
    pool.set_policy(keep_free_bytes=4 * MB)  # the caller keeps 4 MB free, after the first engine was made
    second = smollm2_engine(smollm2, mode="elastic", pool=pool)
    outputs = {first: {}, second: {}}
    ids = {llm: [llm.add_request(p, GREEDY) for p in PROMPTS] for llm in outputs}
    while any(llm.has_unfinished_requests() for llm in outputs):
        for llm in outputs:
            if llm.has_unfinished_requests():
                outputs[llm].update((o.request_id, o.token_ids) for o in llm.step())
        rooms = first.memory.activation_room + second.memory.activation_room
        assert pool.policy["keep_free_bytes"] == 4 * MB + rooms
    for llm in outputs:
        assert [outputs[llm][i] for i in ids[llm]] == reference
    assert pool.policy["keep_free_bytes"] == 4 * MB  # both idle
    first.close()
    second.close()
    assert pool.policy["keep_free_bytes"] == 4 * MB and pool.stats()["mapped_device_bytes"] == 0


def test_a_static_engine_that_fails_to_map_its_pool_leaves_keep_free_bytes_as_it_was(smollm2, monkeypatch):
    from torch_ellm.integrations.engine.kv_cache import KVCache

    pool = shared_pool()
    pool.set_policy(keep_free_bytes=MB)

    def refuse(self, num_blocks):
        raise torch.OutOfMemoryError("refused for the test")

    monkeypatch.setattr(KVCache, "resize", refuse)
    with pytest.raises(torch.OutOfMemoryError, match="refused"):
        smollm2_engine(smollm2, mode="static", pool=pool)
    assert pool.policy["keep_free_bytes"] == MB


def test_reading_borrowed_kv_costs_nothing_more_on_the_host_and_measuring_it_leaves_the_pool_as_it_was():
    chunk = 256 << 10
    pool = torch_ellm.Pool("host", budget_bytes=64 * chunk, host_budget_bytes=32 * chunk, chunk_bytes=chunk)
    assert host_read_seconds(pool) == 0.0  # host memory both sides: the same reads
    stats = pool.stats()
    assert stats["mapped_device_bytes"] == 0 and pool.borrowed_bytes == 0 and stats["borrowed_peak_bytes"] > 0
    llm = LLM(small_llama(512), pool=pool, policy="slo", preemption="borrow", block_size=16,
              max_num_batched_tokens=64, max_model_len=512)
    assert llm.cost.borrowed_byte_seconds == 0.0  # the SLO policy borrows as eLLM's logical buffer allows
    llm.close()
    assert host_read_seconds(torch_ellm.Pool("host", budget_bytes=64 * chunk, chunk_bytes=chunk)) is None  # no host
    tenant = pool.virtual_tensor(63 * chunk, tag="weights")
    tenant.resize(63 * chunk)
    with pytest.warns(UserWarning, match="no free room to measure"):
        crowded = LLM(small_llama(512), pool=pool, policy="slo", preemption="borrow", block_size=16,
                      max_num_batched_tokens=64, max_model_len=512)
    assert crowded.cost.borrowed_byte_seconds == 0.0 and pool.stats()["mapped_device_bytes"] == 63 * chunk
    crowded.close()
    tenant.release()


def test_measuring_borrowed_reads_asks_no_one_for_memory():
    """The pool counts whole chunks: a budget of 14.9 and keep_free of 0.1 chunk leave 13 free beside a
    tenant's one, not 13.8. A probe sized by the bytes would make the pool move the tenant to host memory."""
    chunk = 256 << 10
    pool = torch_ellm.Pool("host", budget_bytes=149 * chunk // 10, host_budget_bytes=32 * chunk, chunk_bytes=chunk)
    pool.set_policy(keep_free_bytes=chunk // 10)
    tenant = pool.virtual_tensor(chunk, tag="kv")
    tenant.resize(chunk)
    assert host_read_seconds(pool) == 0.0
    stats = pool.stats()
    assert stats["num_borrows"] == 0 and stats["num_deflations"] == 0 and tenant.host_bytes == 0
    tenant.release()
