"""Prefix caching: full blocks shared by prompts are computed once and reused in place, outputs stay
token-identical, and cached blocks neither leak nor keep the KV cache mapped."""
import contextlib
import random

import pytest
import torch

from test_engine import MB, assert_pool_empty, one_thread, smollm2_engine, tiny_engine, tiny_model  # noqa: F401
from torch_ellm.integrations.engine.block_manager import BlockManager
from torch_ellm.integrations.engine.llm import LLM
from torch_ellm.integrations.engine.sampling_params import SamplingParams
from torch_ellm.integrations.engine.sequence import Sequence

GREEDY = SamplingParams(temperature=0, max_tokens=10)
LONG_TEXT = ("In the beginning of the twentieth century, the small town by the river had grown into a busy market "
             "where farmers from the valley brought grain, cattle and wool every Saturday morning, and the old "
             "mill by the bridge ground flour for the bakers of three villages. When the railway reached the "
             "valley, the market doubled in size.")


@pytest.fixture(scope="module")
def shared_prompts(smollm2):
    """Token-id prompts on a 64-token common prefix (4 blocks of 16): two continuations, the prefix
    alone twice (all of it cached: its last block runs again) and a prompt sharing 2.5 blocks."""
    tok = smollm2[1]
    prefix = tok(LONG_TEXT)["input_ids"][:64]
    assert len(prefix) == 64
    tails = [" So the town", " Today, nobody"]
    return ([prefix + tok(t)["input_ids"] for t in tails] + [prefix, prefix]
            + [prefix[:40] + tok(" Then the war came")["input_ids"]])


@pytest.fixture(scope="module")
def shared_reference(smollm2, shared_prompts):
    model = smollm2[0]
    return [model.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, do_sample=False)[0, len(p):].tolist()
            for p in shared_prompts]


@pytest.mark.parametrize("mode, caching", [("static", True), ("elastic", True), ("elastic", False)])
def test_shared_prefix_outputs_match_hf(smollm2, shared_prompts, shared_reference, mode, caching):
    llm = smollm2_engine(smollm2, mode=mode, budget_bytes=64 * MB, enable_prefix_caching=caching)
    outs = llm.generate(shared_prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == shared_reference
    cached = [o.metrics["cached_tokens"] for o in outs]
    if caching:  # the first prompt prefills in chunks of 32: the others are admitted after its 4 blocks
        assert cached == [0, 64, 48, 48, 32] and llm.metrics.summary()["cached_tokens"] == sum(cached)
    else:
        assert cached == [0] * 5
    assert_pool_empty(llm)


def test_second_request_reuses_the_first_ones_blocks(tiny_model):
    prefix = list(range(1, 37))  # 9 blocks of 4
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = tiny_engine(tiny_model, mode="elastic")
    first = llm.add_request(prefix + [40, 41, 42, 43], params)
    while not llm.step():  # until its first token: the whole prompt, 10 full blocks, is cached
        pass
    second = llm.add_request(prefix + [50, 51, 52], params)
    llm.step()
    a, b = llm.scheduler.running
    assert b.num_cached_tokens == 36 and b.block_table[:9] == a.block_table[:9]  # shared in place
    assert llm.metrics.steps[-1]["tokens"] == 1 + 3  # the first one's decode, the second one's tail
    assert llm.blocks.num_used == 10 + 1 + 1  # a's 10 (and 1 for decoding), b's tail block
    outs = {}
    while llm.has_unfinished_requests():
        outs.update((o.request_id, o.token_ids) for o in llm.step() if o.finished)
    plain = tiny_engine(tiny_model, mode="elastic", enable_prefix_caching=False)
    assert [outs[first], outs[second]] == [o.token_ids for o in plain.generate(
        [prefix + [40, 41, 42, 43], prefix + [50, 51, 52]], params, use_tqdm=False)]
    plain.close()
    assert_pool_empty(llm)


@pytest.mark.parametrize("mode", ["static", "elastic"])
def test_cached_blocks_survive_idle_only_where_kv_stays_mapped(tiny_model, mode):
    """Free cached blocks are outside the high water: elastic mode unmaps all KV when idle, and with it
    the cache. Static mode keeps its fixed KV pool, and the blocks stay hits."""
    prompt = list(range(1, 30))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm = tiny_engine(tiny_model, mode=mode)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    assert llm.blocks.num_used == 0 and llm.blocks.high_water == 0
    if mode == "elastic":
        assert llm.kv_cache.num_blocks == 0 and llm.pool.stats()["mapped_device_bytes"] == 0
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.token_ids == first.token_ids
    assert again.metrics["cached_tokens"] == (0 if mode == "elastic" else 28)
    assert_pool_empty(llm)


def shared_prefix_load(model, caching):
    """60 greedy requests on 3 prefixes, in a budget that preempts by recompute, some aborted while
    they run; the finished ones' outputs and the run's summary."""
    rng = random.Random(1)
    prefixes = [[rng.randrange(128) for _ in range(rng.randint(8, 40))] for _ in range(3)]
    llm = tiny_engine(model, mode="elastic", budget_bytes=192 << 10, max_num_seqs=8, enable_prefix_caching=caching)
    for i in range(60):
        prompt = rng.choice(prefixes) + [rng.randrange(128) for _ in range(rng.randint(0, 10))]
        llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True), i)
    outs, steps = {}, 0
    while llm.has_unfinished_requests():
        outs.update((o.request_id, o.token_ids) for o in llm.step() if o.finished)
        steps += 1
        if steps % 7 == 0:
            with contextlib.suppress(ValueError):  # already finished
                llm.abort(steps)
    summary = llm.metrics.summary()
    assert_pool_empty(llm)
    return outs, summary


def test_shared_prefixes_under_preemption_and_abort(tiny_model):
    cached, summary = shared_prefix_load(tiny_model, caching=True)
    plain, _ = shared_prefix_load(tiny_model, caching=False)
    common = cached.keys() & plain.keys()
    assert len(common) > 45 and all(cached[i] == plain[i] for i in common)
    assert summary["cached_tokens"] > 500 and summary["preemptions"] > 0


def new_seq(tokens):
    return Sequence(len(tokens), tokens, SamplingParams())


def run(blocks, seq):
    """Admit seq (its cached prefix first), compute all its tokens and cache its full blocks; the
    tokens found cached."""
    found = blocks.take_cached(seq)
    blocks.grow(seq, len(seq))
    seq.num_computed = len(seq)
    blocks.cache_full_blocks(seq)
    return found


def test_block_manager_shares_blocks_by_hash_chain_and_counts_their_users():
    blocks = BlockManager(block_size=4, max_blocks=8, prefix_caching=True)
    a = new_seq(list(range(10)))
    assert run(blocks, a) == 0 and a.block_table == [0, 1, 2] and len(a.block_hashes) == 2  # 2 is not full
    b = new_seq(list(range(8)) + [99, 98, 97])
    assert run(blocks, b) == 8 and b.block_table == [0, 1, 3]
    assert blocks.num_used == 4 and blocks.high_water == 4
    c = new_seq([50, 51, 52, 53, 4, 5, 6, 7, 1])  # a's second block after another first one: a miss
    assert run(blocks, c) == 0 and c.block_table == [4, 5, 6]
    whole = new_seq(list(range(8)))  # all cached: its last block runs again, into a block of its own
    assert run(blocks, whole) == 4 and whole.block_table == [0, 7]
    blocks.free(a)
    assert blocks.num_used == 7  # only a's partial block 2 is free: 0 and 1 have other users
    fresh = new_seq([9] * 4)
    assert run(blocks, fresh) == 0 and fresh.block_table == [2]  # shared blocks are not handed out
    for seq in (b, c, whole, fresh):
        blocks.free(seq)
    assert blocks.num_used == 0 and blocks.high_water == 0


def test_block_manager_keeps_free_blocks_cached_until_handed_out_or_unmapped():
    blocks = BlockManager(block_size=4, max_blocks=8, prefix_caching=True)

    def served(seq):
        """The tokens seq found cached; it then finishes."""
        found = run(blocks, seq)
        blocks.free(seq)
        return found

    assert served(new_seq(list(range(12)))) == 0  # blocks 0-2, all full
    assert blocks.num_used == 0 and blocks.high_water == 0  # cached but free: outside the high water
    again = new_seq(list(range(8)) + [7, 7])
    assert run(blocks, again) == 8 and again.block_table == [0, 1, 2]  # 0 and 1 in place; 2, lowest free, anew
    blocks.free(again)
    assert served(new_seq(list(range(12)) + [1])) == 8  # block 2's K/V were overwritten: no longer a hit
    blocks.forget_unmapped(1)  # the KV cache shrank to 1 block: the others lost their K/V
    assert served(new_seq(list(range(12)) + [2])) == 4


def test_block_manager_spares_cached_blocks_while_mapped_keyless_ones_are_free():
    mapped = [8]  # what the KV cache maps now
    blocks = BlockManager(block_size=4, max_blocks=12, prefix_caching=True, mapped_blocks=lambda: mapped[0])
    prefix = new_seq(list(range(12)))
    run(blocks, prefix)  # blocks 0-2, all full and cached
    blocks.free(prefix)
    other = new_seq([77] * 8)
    assert run(blocks, other) == 0 and other.block_table == [3, 4]  # mapped anyway: the prefix survives
    assert blocks.high_water_after(4) == 8  # 5, 6, 7 first, then the lowest: cached block 0
    blocks.free(other)  # its two full blocks are cached now too
    again = new_seq(list(range(12)) + [5])
    assert run(blocks, again) == 12 and again.block_table == [0, 1, 2, 5]  # keyless 5 spares 3 and 4
    mapped[0] = 0  # nothing mapped beyond the high water (6): the lowest free block goes, cached or not
    late = new_seq([66] * 4)
    assert run(blocks, late) == 0 and late.block_table == [3]


@pytest.mark.parametrize("seed", [6, 9])
def test_cached_block_preference_never_wedges_the_engine(tiny_model, seed):
    """Keyless blocks inside the KV cache's lazily mapped tail are handed out before cached ones, but not
    when that would pin the tail a step needs for its own activations: without chunked prefill (no
    smaller chunk to fall back to) the engine once refused every prompt with nothing running."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(128) for _ in range(rng.randint(4, 24))] for _ in range(3)]
    prompts = [(rng.choice(prefixes) if rng.random() < 0.7 else []) + [rng.randrange(128) for _ in range(rng.randint(1, 20))]
               for _ in range(40)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, min(30, 60 - len(p))), ignore_eos=True)
              for p in prompts]
    llm = LLM(tiny_model, mode="elastic", budget_bytes=192 << 10, chunk_bytes=16 << 10, block_size=4,
              max_num_batched_tokens=48, max_num_seqs=16, chunked_prefill=False)
    pending, aborted = list(range(len(prompts))), set()
    while pending or llm.has_unfinished_requests():
        if pending and rng.random() < 0.5:
            i = pending.pop(0)
            llm.add_request(prompts[i], params[i], request_id=i)
        if rng.random() < 0.015 and llm._requests:
            victim = rng.choice(sorted(llm._requests))
            llm.abort(victim)
            aborted.add(victim)
        llm.step()  # raised "no waiting request fits the budget although none is running" before
    assert len(llm.metrics.requests) == len(prompts) - len(aborted)
    assert_pool_empty(llm)


@pytest.mark.parametrize("seed", [0, 2])
def test_a_cached_prefix_pinning_the_kv_tail_is_left_behind(tiny_model, seed):
    """Without chunked prefill, a waiting request whose cached prefix blocks sit high in the KV cache
    could need the cache mapped up to them beside its activations, over the budget, and was refused for
    ever with nothing running; it now runs without them (in blocks low down) instead."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(128) for _ in range(rng.randint(8, 24))] for _ in range(2)]
    prompts = [((rng.choice(prefixes) if rng.random() < 0.6 else []) + [rng.randrange(128) for _ in range(rng.randint(1, 20))])[:32]
               for _ in range(30)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 90), ignore_eos=True) for _ in prompts]
    args = dict(chunk_bytes=16 << 10, block_size=8, max_num_batched_tokens=32, max_num_seqs=64, chunked_prefill=False)
    roomy = LLM(tiny_model, mode="elastic", budget_bytes=8 * MB, **args)
    want = [o.token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    roomy.close()
    llm = LLM(tiny_model, mode="elastic", budget_bytes=192 << 10, **args)
    got, pending = {}, list(range(len(prompts)))
    while pending or llm.has_unfinished_requests():
        if pending and rng.random() < 0.5:
            i = pending.pop(0)
            llm.add_request(prompts[i], params[i], request_id=i)
        for out in llm.step():  # raised "no waiting request fits the budget although none is running" before
            if out.finished:
                got[out.request_id] = out.token_ids
    assert [got[i] for i in range(len(prompts))] == want
    assert llm.metrics.summary()["cached_tokens"] > 0
    assert_pool_empty(llm)


@pytest.mark.parametrize("seed", range(4))
def test_block_manager_answers_stay_true_as_blocks_change(seed):
    """high_water_after answers from memory while nothing changed: after every change it must agree with
    the picks worked out anew, and least_high_water_after must never exceed it. grow() hands out the
    picks, and the free lists stay sorted and hold every block not in use."""
    rng = random.Random(seed)
    mapped = [0]
    blocks = BlockManager(block_size=4, max_blocks=64, prefix_caching=True, mapped_blocks=lambda: mapped[0])
    prefixes = [[rng.randrange(100) for _ in range(12)] for _ in range(3)]
    live = []

    def check():
        for extra in {0, 1, 2, rng.randrange(blocks.num_free + 1), blocks.num_free}:
            for compact in (False, True):
                answer = blocks.high_water_after(extra, compact)
                picks, _ = blocks._picks(extra, compact)
                assert answer == max([blocks.high_water] + [b + 1 for b in picks])
                assert blocks.least_high_water_after(extra) <= answer
        assert blocks.high_water_after(blocks.num_free + 1) is None
        # Every block is in use or in exactly one of the free lists, which stay sorted.
        for free in (blocks._free, blocks._free_cached):
            assert free == sorted(free, reverse=True)
        assert sorted(blocks._free + blocks._free_cached + list(blocks._refs)) == list(range(64))

    for _ in range(300):
        check()  # remembered now; the change below must make it forget
        op = rng.random()
        if op < 0.45 and blocks.num_free > 8:
            tail = [rng.randrange(100) for _ in range(rng.randrange(1, 12))]
            seq = new_seq(rng.choice(prefixes)[:rng.randrange(4, 13)] + tail)
            blocks.take_cached(seq)  # as the scheduler admits: the cached prefix, then questions, then growth
            check()
            need = blocks.blocks_for(len(seq)) - len(seq.block_table)
            picks, _ = blocks._picks(need)
            blocks.grow(seq, len(seq))
            assert seq.block_table[len(seq.block_table) - need:] == picks
            seq.num_computed = len(seq)
            blocks.cache_full_blocks(seq)
            live.append(seq)
        elif op < 0.8 and live:
            blocks.free(live.pop(rng.randrange(len(live))))
        elif op < 0.9:
            blocks.forget_unmapped(rng.randrange(blocks.high_water, 65))
        else:
            mapped[0] = rng.randrange(blocks.high_water, 65)  # the KV cache maps more or less
    check()
