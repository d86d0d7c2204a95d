"""Swap preemption: a preempted request's K/V go to a host buffer and come back, layer by layer, into
fresh blocks; outputs are unchanged, host memory always comes back, and no room means recompute."""
import random

import pytest
import torch

from test_engine import MB, assert_pool_empty, make_engine, one_thread, tiny_model  # noqa: F401
import torch_ellm
from torch_ellm import Pool
from torch_ellm.integrations.engine.kv_cache import KVCache
from torch_ellm.integrations.engine.sampling_params import SamplingParams
from torch_ellm.integrations.engine.sequence import Sequence
from torch_ellm.integrations.engine.step_cost import StepCost, StepWork
from torch_ellm.integrations.engine.swap import LayerCopies, SwapSpace, _runs

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def swap_engine(model, budget, host_budget, host_tier="auto", **kwargs):
    pool = Pool("host", budget_bytes=budget, host_budget_bytes=host_budget, chunk_bytes=16 << 10,
                host_tier=host_tier)
    args = dict(block_size=4, max_num_batched_tokens=32, max_num_seqs=16, preemption="swap")
    return make_engine(model, pool=pool, **{**args, **kwargs})


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(128) for _ in range(rng.randint(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def unpreempted(tiny_model):
    llm = make_engine(tiny_model, budget_bytes=4 * MB, block_size=4, max_num_batched_tokens=32, max_num_seqs=16,
                      chunk_bytes=16 << 10)
    outs = [o.token_ids for o in llm.generate(prompts(30), PARAMS, use_tqdm=False)]
    llm.close()
    return outs


def test_runs_group_consecutive_blocks():
    assert _runs([3, 4, 5, 9, 1, 2]) == [[0, 3, 3], [3, 9, 1], [4, 1, 2]]
    assert _runs([]) == []


@pytest.mark.parametrize("overlap", [True, False])
def test_kv_round_trips_through_host_into_other_blocks(overlap):
    """Scattered blocks out, other scattered blocks in: every layer's K/V land where the new table says."""
    pool = Pool("host", budget_bytes=4 * MB, host_budget_bytes=1 * MB, chunk_bytes=16 << 10)
    kv = KVCache(pool, num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, max_blocks=32, dtype=torch.float32)
    kv.resize(16)
    for view in kv.views:
        view.copy_(torch.randn(view.shape))
    del view  # a live view would keep the cache from being released
    seq = Sequence(0, list(range(19)), SamplingParams())
    seq.block_table, seq.num_computed = [7, 8, 2, 11, 12], 18  # 5 blocks hold the 18 computed tokens
    before = [view[seq.block_table].clone() for view in kv.views]
    swap = SwapSpace(pool, kv, overlap=overlap)
    assert swap.swap_out(seq, allowance=1 * MB) and swap.holds(seq)
    assert pool.host_buffer_bytes == swap.nbytes >= 3 * 5 * kv.block_bytes
    for layer in range(3):
        kv.views[layer].zero_()
    seq.block_table = [0, 1, 5, 20, 21]
    copies = swap.swap_in([(seq, 0)])
    kv.resize(24)  # the step maps its blocks after the copies are planned: they must use the new views
    copies.start()
    for layer in range(3):
        copies.wait(layer)
        assert torch.equal(kv.views[layer][seq.block_table], before[layer])
    copies.finish()
    swap.done([seq], copies)
    assert not swap.holds(seq) and pool.host_buffer_bytes == 0
    # what pays_off prices copies by: (fixed, bytes) -> seconds, each way
    assert swap.copy_out.history()[0][0] == swap.copy_in.history()[0][0] == (1, 3 * 5 * kv.block_bytes)
    assert all(float(view[[2, 3, 4, 6]].abs().sum()) == 0 for view in kv.views)  # nothing else written
    kv.release()


def test_swap_out_respects_the_allowance_and_the_host_budget():
    pool = Pool("host", budget_bytes=4 * MB, host_budget_bytes=64 << 10, chunk_bytes=16 << 10)
    kv = KVCache(pool, num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, max_blocks=64, dtype=torch.float32)
    kv.resize(64)
    swap = SwapSpace(pool, kv)
    seqs = []
    for i in range(4):
        seq = Sequence(i, [1] * 40, SamplingParams())
        seq.block_table, seq.num_computed = list(range(10 * i, 10 * i + 10)), 40  # 2 x 10 x 256 B: one chunk
        seqs.append(seq)
    assert not swap.swap_out(seqs[0], allowance=1)  # the policy allows less than it needs
    assert not swap.swap_out(seqs[0], allowance=2 * 10 * kv.block_bytes - 1)  # rounded up to a chunk
    assert all(swap.swap_out(s, allowance=1 * MB) for s in seqs)  # 4 chunks: the host budget exactly
    fresh = Sequence(9, [1] * 40, SamplingParams())
    fresh.block_table, fresh.num_computed = list(range(50, 60)), 40
    assert not swap.swap_out(fresh, allowance=1 * MB)  # host budget full: the caller recomputes instead
    swap.discard(seqs[0])
    assert pool.host_buffer_bytes == 3 * pool.chunk_bytes
    swap.release()
    assert pool.host_buffer_bytes == 0 and pool.stats()["num_ooms"] == 0  # refusals are not OOMs
    kv.release()


def fitted_cost(per_token, per_pair, observed=5):
    """A step cost model that has learned (from 5 steps: ready) 1 ms a step, plus per_token and per_pair seconds."""
    cost = StepCost(min_steps=5)
    for tokens, pairs in [(1, 10), (64, 2000), (256, 40000), (32, 100), (128, 9000)][:observed]:
        cost.observe(StepWork(tokens, pairs, 0), 0.001 + per_token * tokens + per_pair * pairs)
    return cost


def measured(swap, fixed, per_byte):
    """Copies each way measured at `fixed` seconds a swap plus `per_byte`."""
    for fit in (swap.copy_out, swap.copy_in):
        for nbytes in (1 << 10, 1 << 20):
            fit.add((1, nbytes), fixed + per_byte * nbytes)


def auto_case():
    pool = Pool("host", budget_bytes=4 * MB, host_budget_bytes=1 * MB, chunk_bytes=16 << 10)
    kv = KVCache(pool, num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, max_blocks=64, dtype=torch.float32)
    short, long = Sequence(0, [1] * 9, SamplingParams()), Sequence(1, [1] * 201, SamplingParams())
    short.block_table, short.num_computed = [0, 1], 8  # 2 blocks of 3 x 512 B
    long.block_table, long.num_computed = list(range(2, 52)), 200  # 50 blocks
    return pool, kv, short, long


def test_auto_swaps_where_the_copies_cost_less_than_prefilling_again():
    pool, kv, short, long = auto_case()
    swap = SwapSpace(pool, kv, fitted_cost(per_token=1e-4, per_pair=1e-6))
    assert swap.pays_off(short) and swap.pays_off(long)  # no copy measured yet: swap, and learn what it costs
    measured(swap, fixed=5e-4, per_byte=1e-7)
    # short: 2 x (0.5 ms + 3 KiB) = 1.6 ms of copies against 8 tokens prefilled again (0.8 + 0.04 ms): recompute
    # long: 2 x (0.5 ms + 75 KiB) = 16 ms against 200 tokens and 20,100 attention pairs (20 + 20 ms): swap
    assert not swap.pays_off(short) and swap.pays_off(long)
    # 180 of long's tokens shared with other requests stay cached: recompute runs 20 tokens after them
    # (2 + 3.8 ms) and the copy back only 5 blocks (8.2 + 1.3 ms of copies): recompute
    assert not swap.pays_off(long, shared_tokens=180)
    unready = SwapSpace(pool, kv, fitted_cost(1e-4, 1e-6, observed=3))
    measured(unready, fixed=5e-4, per_byte=1e-7)
    assert unready.pays_off(short)  # the step cost model has not seen enough steps: swap
    for _ in range(8):
        measured(swap, fixed=0.0, per_byte=0.0)  # 16 swaps since, their copies measured free
    assert swap.pays_off(short)  # the fit forgets older swaps


def test_auto_swaps_now_and_then_to_keep_the_copy_costs_measured():
    pool, kv, short, _ = auto_case()
    swap = SwapSpace(pool, kv, fitted_cost(per_token=1e-4, per_pair=1e-6))
    measured(swap, fixed=1.0, per_byte=0.0)  # one slow measurement must not decide forever
    kv.resize(2)
    for _ in range(3):
        assert [swap.worth_swapping(short) for _ in range(SwapSpace.EXPLORE)] == [False] * (SwapSpace.EXPLORE - 1) + [True]
        assert swap.swap_out(short, allowance=1 * MB)  # the explored swap: measured, the count starts again
        swap.discard(short)
    assert len(swap.copy_out.history()) == 2 + 3
    swap.release()
    kv.release()


@pytest.mark.parametrize("copies_cost", [1e6, 0.0])
def test_auto_preemption_follows_the_measured_costs(tiny_model, unpreempted, monkeypatch, copies_cost):
    """Copies measured far slower than prefill: preemptions recompute but for one in SwapSpace.EXPLORE;
    measured free: they all swap. Outputs are the same either way."""
    llm = swap_engine(tiny_model, budget=160 << 10, host_budget=2 * MB, preemption="auto")
    for tokens, pairs in [(1, 10), (64, 2000), (256, 40000), (32, 100), (128, 9000), (8, 40), (16, 200), (4, 4)]:
        llm.cost.observe(StepWork(tokens, pairs, 0), 0.001 + 1e-5 * tokens + 1e-8 * pairs)
    measured(llm.swap, fixed=copies_cost, per_byte=0.0)
    for fit in (llm.swap.copy_out, llm.swap.copy_in):  # the run's own copies would be measured too
        monkeypatch.setattr(fit, "add", lambda features, seconds: None)
    outs = llm.generate(prompts(30), PARAMS, use_tqdm=False)
    assert [o.token_ids for o in outs] == unpreempted
    summary = llm.metrics.summary()
    assert summary["preemptions"] >= SwapSpace.EXPLORE
    if copies_cost:
        assert summary["swap_ins"] <= summary["preemptions"] // SwapSpace.EXPLORE
    else:
        assert summary["swap_ins"] == summary["preemptions"]
    assert_pool_empty(llm)


def test_a_failed_copy_is_raised_in_the_model_thread():
    pool = Pool("host", budget_bytes=1 * MB, host_budget_bytes=1 * MB, chunk_bytes=16 << 10)
    kv = KVCache(pool, num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, max_blocks=8, dtype=torch.float32)
    kv.resize(8)
    swap = SwapSpace(pool, kv)
    seq = Sequence(0, [1] * 8, SamplingParams())
    seq.block_table, seq.num_computed = [0, 1], 8
    assert swap.swap_out(seq, allowance=1 * MB)
    seq.block_table = [7, 8]  # block 8 is past the cache: the worker's copy fails
    copies = swap.swap_in([(seq, 0)])
    copies.start()
    with pytest.raises(RuntimeError, match="swapped K/V"):
        copies.wait(0)
    copies.finish()
    assert swap.holds(seq)  # the K/V are kept for another try
    swap.release()
    assert pool.host_buffer_bytes == 0
    kv.release()


@pytest.mark.parametrize("host_tier", ["mapped", "parked"])
def test_outputs_match_an_unpreempted_run(tiny_model, unpreempted, host_tier):
    llm = swap_engine(tiny_model, budget=160 << 10, host_budget=2 * MB, host_tier=host_tier)
    outs = llm.generate(prompts(30), PARAMS, use_tqdm=False)
    assert [o.token_ids for o in outs] == unpreempted
    summary = llm.metrics.summary()
    assert summary["swap_ins"] > 0 and summary["peak_borrowed_bytes"] == 0
    assert llm.pool.host_buffer_bytes == 0
    assert_pool_empty(llm)


def test_no_host_room_falls_back_to_recompute(tiny_model, unpreempted):
    llm = swap_engine(tiny_model, budget=160 << 10, host_budget=32 << 10)  # two 16 KiB chunks of swap space
    outs = llm.generate(prompts(30), PARAMS, use_tqdm=False)
    assert [o.token_ids for o in outs] == unpreempted
    summary = llm.metrics.summary()
    assert 0 < summary["swap_ins"] < summary["preemptions"]
    assert summary["peak_swapped_bytes"] <= 32 << 10
    assert llm.pool.stats()["num_ooms"] == 0
    assert_pool_empty(llm)


def test_swapping_inside_inference_mode(tiny_model, unpreempted):
    """Serving code often runs under torch.inference_mode(): the cache views are then inference tensors,
    which the copy-back thread must be allowed to write."""
    llm = swap_engine(tiny_model, budget=160 << 10, host_budget=2 * MB)
    with torch.inference_mode():
        outs = llm.generate(prompts(30), PARAMS, use_tqdm=False)
    assert [o.token_ids for o in outs] == unpreempted
    assert llm.metrics.summary()["swap_ins"] > 0
    assert_pool_empty(llm)


class Flaky:
    """Wraps a method to raise `error` on its first `failures` calls that `when` accepts."""

    def __init__(self, method, error, failures=1, when=lambda *a, **k: True):
        self.method, self.error, self.left, self.when = method, error, failures, when

    def __call__(self, *args, **kwargs):
        if self.left and self.when(*args, **kwargs):
            self.left -= 1
            raise type(self.error)(*self.error.args)  # a fresh one: a raised error keeps its frames
        return self.method(*args, **kwargs)


class FailingCopy(Exception):
    """Stands for whatever a torch copy may raise."""


@pytest.mark.parametrize("where", ["begin_step", "copy back", "copy back, not overlapped", "swap out",
                                   "copy out"])
def test_a_failed_step_loses_no_swapped_request(tiny_model, unpreempted, monkeypatch, where):
    """A step that fails (no memory after all, a copy or host allocation error) leaves every request
    servable: swapped ones wait again with their K/V still in host memory, and retrying finishes all of
    them with the same tokens. Right after a failure, a swapped request can be aborted (no view of its
    host buffer kept alive by the error)."""
    llm = swap_engine(tiny_model, budget=160 << 10, host_budget=2 * MB)
    if where == "begin_step":
        error = torch_ellm.OutOfMemoryError("injected")
        flaky = Flaky(llm.memory.begin_step, error, failures=3, when=lambda *a: bool(llm.scheduler.swapped_in))
        monkeypatch.setattr(llm.memory, "begin_step", flaky)
    elif where.startswith("copy back"):
        llm.swap.overlap = where == "copy back"
        flaky = Flaky(LayerCopies._copy_layer, FailingCopy("injected"), failures=3)
        monkeypatch.setattr(LayerCopies, "_copy_layer", lambda self, layer: flaky(self, layer))
    elif where == "swap out":
        error = torch_ellm.BackendError("injected")
        monkeypatch.setattr(llm.pool, "host_buffer", Flaky(llm.pool.host_buffer, error, failures=3))
    else:
        flaky_out = Flaky(SwapSpace._copy_out, FailingCopy("injected"), failures=3)
        monkeypatch.setattr(SwapSpace, "_copy_out", lambda self, host, blocks: flaky_out(self, host, blocks))
    ids = [llm.add_request(p, PARAMS) for p in prompts(30)]
    failures, outs, aborted = 0, {}, set()
    while llm.has_unfinished_requests():
        try:
            outs.update((o.request_id, o.token_ids) for o in llm.step() if o.finished)
        except (torch_ellm.OutOfMemoryError, RuntimeError) as e:
            assert "injected" in str(e)
            failures += 1
            queued = len(llm.scheduler.running) + len(llm.scheduler.waiting)
            assert queued == len(llm._requests)  # nobody dropped out of both queues
            swapped = [i for i, seq in llm._requests.items() if llm.swap.holds(seq)]
            if swapped and not aborted:
                llm.abort(swapped[0])
                aborted.add(swapped[0])
    assert failures == 3 and (aborted or where in ("swap out", "copy out"))
    assert [outs.get(i) for i in ids] == [None if i in aborted else ref for i, ref in zip(ids, unpreempted)]
    assert llm.metrics.summary()["swap_ins"] > 0
    assert llm.pool.host_buffer_bytes == 0
    assert_pool_empty(llm)


def test_aborting_swapped_requests_gives_their_host_memory_back(tiny_model):
    llm = swap_engine(tiny_model, budget=160 << 10, host_budget=2 * MB)
    ids = [llm.add_request(p, PARAMS) for p in prompts(30)]
    while not llm.swap.nbytes:
        llm.step()
    swapped = [i for i in ids if i in llm._requests and llm.swap.holds(llm._requests[i])]
    assert swapped
    for request_id in swapped:
        llm.abort(request_id)
    assert llm.pool.host_buffer_bytes == llm.swap.nbytes
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.pool.host_buffer_bytes == 0
    assert_pool_empty(llm)


def test_random_requests_with_swapping_leak_nothing(tiny_model):
    rng = random.Random(1)
    llm = swap_engine(tiny_model, budget=160 << 10, host_budget=96 << 10)
    for _ in range(300):
        params = SamplingParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randint(1, 30), seed=rng.randrange(9))
        request_id = llm.add_request([rng.randrange(128) for _ in range(rng.randint(1, 30))], params)
        if rng.random() < 0.1:
            llm.abort(request_id)
        if rng.random() < 0.5:
            llm.step()
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.metrics.summary()["swap_ins"] > 0
    assert llm.pool.host_buffer_bytes == 0
    assert_pool_empty(llm)


def test_swapped_requests_share_cached_prefix_blocks_on_the_way_back(tiny_model):
    """Requests on a common prefix: one coming back from host memory takes the prefix's cached blocks
    (shared, not copied over) and only its own blocks are copied; outputs match an unpreempted run."""
    rng = random.Random(2)
    prefix = [rng.randrange(128) for _ in range(24)]  # six blocks of 4
    shared = [prefix + [rng.randrange(128) for _ in range(rng.randint(2, 12))] for _ in range(24)]
    reference = make_engine(tiny_model, budget_bytes=4 * MB, block_size=4, max_num_batched_tokens=32,
                            max_num_seqs=16, chunk_bytes=16 << 10)
    expected = [o.token_ids for o in reference.generate(shared, PARAMS, use_tqdm=False)]
    reference.close()
    llm = swap_engine(tiny_model, budget=160 << 10, host_budget=2 * MB)
    skipped = []
    swap_in = llm.swap.swap_in

    def recording(admitted):
        skipped.extend(first for _, first in admitted)
        return swap_in(admitted)

    llm.swap.swap_in = recording
    outs = llm.generate(shared, PARAMS, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    # The prefix found cached, not copied back (and some found their own full blocks still cached too).
    assert skipped and max(skipped) >= 6
    assert_pool_empty(llm)


@pytest.mark.parametrize("preemption, host_tier, warned", [
    ("swap", "auto", "no host budget"), ("borrow", "auto", "no host budget"), ("borrow", "parked", "parked")])
def test_preemption_that_cannot_use_host_memory_warns(tiny_model, preemption, host_tier, warned):
    host_budget = 0 if warned == "no host budget" else 1 * MB
    pool = Pool("host", budget_bytes=1 * MB, host_budget_bytes=host_budget, chunk_bytes=16 << 10, host_tier=host_tier)
    with pytest.warns(UserWarning, match=warned):
        llm = make_engine(tiny_model, pool=pool, preemption=preemption, block_size=4, max_num_batched_tokens=32)
    llm.close()
