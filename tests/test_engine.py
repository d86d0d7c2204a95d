"""The paged-KV engine: outputs match Hugging Face generate, memory comes back, bad requests are refused."""
import contextlib
import random
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torch_ellm import Pool
from torch_ellm.integrations.engine.kv_cache import KVCache
from torch_ellm.integrations.engine.llm import LLM
from torch_ellm.integrations.engine.sampling_params import SamplingParams
from torch_ellm.integrations.engine.metrics import RunMetrics
from torch_ellm.integrations.engine.policy import SLOPolicy
from torch_ellm.integrations.engine.step_cost import StepCost, StepWork

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The waves",
    "Q: What is two plus two?\nA:",
    "In the beginning of the twentieth century, the small town by the river had grown into a busy "
    "market where farmers from the valley brought grain, cattle and wool every Saturday morning, and",
    "def fibonacci(n):",
    "Once upon a time",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12)
MB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matmuls on a busy 2-core machine run far faster on one thread (no OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(smollm2):
    """HF greedy continuations, one prompt at a time (no padding)."""
    model, tok = smollm2
    outs = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=GREEDY.max_tokens, do_sample=False)
        outs.append(out[0, ids.shape[1]:].tolist())
    return outs


PROFILES = {}  # model id -> activation profile: measured once, reused by every engine on the model


def smollm2_engine(smollm2, **kwargs):
    defaults = dict(max_model_len=256, max_num_batched_tokens=32, block_size=16)
    if "pool" not in kwargs:  # a given pool brings its own chunk size
        defaults["chunk_bytes"] = 64 << 10
    return make_engine(*smollm2, **{**defaults, **kwargs})


def make_engine(model, tokenizer=None, **kwargs):
    llm = LLM(model, tokenizer, activation_profile=PROFILES.get(id(model)), **kwargs)
    PROFILES[id(model)] = llm.profile
    return llm


def assert_pool_empty(llm):
    """Nothing but the static reserve left: no block in use, KV mapped only as the mode keeps it."""
    assert llm.blocks.num_used == 0
    assert llm.pool.borrowed_bytes == 0
    if llm.memory.mode == "elastic":
        assert llm.pool.stats()["mapped_device_bytes"] == 0
    llm.close()
    assert llm.pool.stats()["mapped_device_bytes"] == 0


@pytest.mark.parametrize("mode", ["static", "elastic"])
def test_greedy_matches_hf_with_chunked_prefill(smollm2, reference, mode):
    llm = smollm2_engine(smollm2, mode=mode, budget_bytes=64 * MB)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert outs[0].text == smollm2[1].decode(reference[0], skip_special_tokens=True)
    assert max(s["tokens"] for s in llm.metrics.steps) == 32  # the long prompt ran in chunks
    assert_pool_empty(llm)


@pytest.mark.parametrize("preemption, host_tier, overlap", [
    ("recompute", "auto", True), ("borrow", "auto", True),
    ("swap", "mapped", True), ("swap", "parked", True), ("swap", "mapped", False), ("auto", "mapped", True)])
def test_greedy_matches_hf_across_preemption(smollm2, reference, preemption, host_tier, overlap):
    # 6 MiB holds the prompts as they are admitted (each needs room for its whole prompt) but not all
    # of them as they decode: running requests are preempted, swapped or borrow.
    pool = Pool("host", budget_bytes=6 * MB, host_budget_bytes=0 if preemption == "recompute" else 32 * MB,
                chunk_bytes=64 << 10, host_tier=host_tier)
    llm = smollm2_engine(smollm2, mode="elastic", pool=pool, preemption=preemption)
    llm.swap.overlap = overlap
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    summary = llm.metrics.summary()
    assert summary["preemptions"] > 0 or preemption == "borrow"
    assert (summary["peak_borrowed_bytes"] > 0) == (preemption == "borrow")
    # auto: the first preemptions swap (no copy measured yet), later ones as the costs say
    assert (summary["swap_ins"] > 0) == (summary["peak_swapped_bytes"] > 0) == (preemption in ("swap", "auto"))
    assert pool.host_buffer_bytes == 0
    assert_pool_empty(llm)


@pytest.mark.parametrize("mode, budget, preemption", [("static", 64, "recompute"), ("elastic", 64, "recompute"),
                                                      ("elastic", 6, "recompute"), ("elastic", 6, "swap")])
def test_prefill_first_runs_no_decode_beside_a_prefill_and_matches_hf(smollm2, reference, mode, budget, preemption):
    """vLLM's scheduling without chunked prefill: a step that can prefill runs no decode, not even of a
    request back from swap. With 6 MiB the decodes outgrow the device and are preempted."""
    pool = Pool("host", budget_bytes=budget * MB, host_budget_bytes=32 * MB, chunk_bytes=64 << 10)
    llm = smollm2_engine(smollm2, mode=mode, pool=pool, preemption=preemption, prefill_first=True)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    steps = llm.metrics.steps
    assert all(s["decode_batch"] == 0 for s in steps if s["tokens"] > s["decode_batch"])
    assert max(s["decode_batch"] for s in steps) > 1  # the decodes waited, then ran together
    summary = llm.metrics.summary()
    assert (summary["preemptions"] > 0) == (budget == 6) and (summary["swap_ins"] > 0) == (preemption == "swap")
    # The same engine without prefill_first mixes them: the assertion above tells the two apart.
    default = smollm2_engine(smollm2, mode=mode, budget_bytes=64 * MB)
    default.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert any(s["decode_batch"] and s["tokens"] > s["decode_batch"] for s in default.metrics.steps)
    default.close()
    assert_pool_empty(llm)


def small_llama(max_position_embeddings=128):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return small_llama()


def tiny_engine(model, **kwargs):
    args = dict(budget_bytes=2 * MB, chunk_bytes=16 << 10, block_size=4, max_num_batched_tokens=32)
    return make_engine(model, **{**args, **kwargs})


def test_thousand_random_requests_leak_nothing(tiny_model):
    rng = random.Random(0)
    llm = tiny_engine(tiny_model, mode="elastic", budget_bytes=1 * MB, max_num_seqs=16)
    done = 0
    for _ in range(1000):
        prompt = [rng.randrange(128) for _ in range(rng.randint(1, 20))]
        params = SamplingParams(temperature=rng.choice([0, 0.8]), top_k=rng.choice([0, 5]), top_p=rng.choice([1, .9]),
                                max_tokens=rng.randint(1, 6), seed=rng.randrange(100))
        request_id = llm.add_request(prompt, params)
        if rng.random() < 0.1:
            llm.abort(request_id)
        if rng.random() < 0.3:
            done += sum(o.finished for o in llm.step())
    while llm.has_unfinished_requests():
        done += sum(o.finished for o in llm.step())
    assert done == len(llm.metrics.requests) and done > 800
    assert_pool_empty(llm)


def test_borrowing_never_promises_more_than_the_kv_on_the_device(tiny_model):
    """A step whose activations take the whole budget cannot make room by borrowing once the KV is all
    on the host already: the scheduler must see that (preempt or wait), not the step fail midway."""
    rng = random.Random(0)
    llm = tiny_engine(tiny_model, mode="elastic", budget_bytes=128 << 10, max_num_seqs=16, preemption="borrow",
                      host_budget_bytes=1 * MB)
    reference = tiny_engine(tiny_model, mode="elastic", budget_bytes=2 * MB)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(3, 40))] for _ in range(30)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    assert llm.metrics.summary()["peak_borrowed_bytes"] > 0
    reference.close()
    assert_pool_empty(llm)


def test_seeded_sampling_repeats(tiny_model):
    llm = tiny_engine(tiny_model)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=8, seed=7, ignore_eos=True)
    first, second = llm.generate([[1, 2, 3], [1, 2, 3]], params, use_tqdm=False)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 8
    llm.close()


@pytest.mark.parametrize("bad", [
    dict(prompt=[]),
    dict(prompt=list(range(100)), params=SamplingParams(max_tokens=50)),  # longer than max_model_len 128
    dict(prompt=[1000]),  # outside the vocabulary
    dict(prompt="text", params=None),  # no tokenizer
])
def test_bad_requests_are_refused_and_serving_goes_on(tiny_model, bad):
    llm = tiny_engine(tiny_model)
    good = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError):
        llm.add_request(bad["prompt"], bad.get("params"))
    with pytest.raises(ValueError, match="no unfinished request"):
        llm.abort("nobody")
    outs = []
    while llm.has_unfinished_requests():
        outs += [o for o in llm.step() if o.finished]
    assert [o.request_id for o in outs] == [good] and len(outs[0].token_ids) == 4
    assert_pool_empty(llm)


def test_request_larger_than_budget_is_refused(tiny_model):
    llm = tiny_engine(tiny_model, mode="static", budget_bytes=160 << 10)  # KV: one 16 KiB chunk a layer
    limit = llm.memory.max_blocks_alone() * llm.blocks.block_size
    with pytest.raises(ValueError, match="KV blocks"):
        llm.add_request([1] * (limit + 1 - 4), SamplingParams(max_tokens=4))
    assert llm.generate([[1] * 10], SamplingParams(max_tokens=3), use_tqdm=False)[0].finished
    llm.close()


@pytest.mark.parametrize("values", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(max_tokens=0), dict(seed="x")])
def test_invalid_sampling_values(values):
    with pytest.raises(ValueError):
        SamplingParams(**values)


def test_static_mode_fixes_kv_pool_and_elastic_follows_the_batch(tiny_model):
    prompts = [[i + 1] * 30 for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    results = {}
    for mode in ("static", "elastic"):
        llm = tiny_engine(tiny_model, mode=mode)
        results[mode] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        kv = [s["kv_bytes"] for s in llm.metrics.steps]
        if mode == "static":
            assert len(set(kv)) == 1  # fixed at start-up
        else:
            assert min(kv) < max(kv) and llm.kv_cache.num_blocks == 0  # grew and shrank back
        llm.close()
    assert results["static"] == results["elastic"]


WORK = StepWork(tokens=12, pairs=78, decodes=12)  # a decode-only step of 12


def slo_request(arrival=0.0, ttft_slo=1.0, tpot_slo=0.1, first_token_time=None):
    return SimpleNamespace(arrival=arrival, ttft_slo=ttft_slo, tpot_slo=tpot_slo, first_token_time=first_token_time)


def test_slo_policy_tpot_breaches_halve_the_batch_cap_and_slack_recovers_it():
    policy = SLOPolicy(StepCost(), host_budget=64 * MB, max_batched_tokens=512, max_num_seqs=32, min_prefill_tokens=16)
    batch = [slo_request() for _ in range(12)]
    for step_seconds in (0.2, 0.05, 0.2):  # injected step times: 2 breaches of the 0.1 s target in 3
        policy.observe(step_seconds, WORK, batch, [], now=0.5)
    assert policy.batch_cap == 32  # the slack step raised nothing above the maximum; 2 breaches are not 3
    policy.observe(0.2, WORK, batch, [], now=0.5)  # 3 in the last 5: down to half the decode batch
    assert policy.batch_cap == 6 and policy.host_buffer == 32 * MB and policy.prefill_budget == 256
    assert policy.max_running(64, [], []) == 6  # no cost model yet: the cap stands in
    for _ in range(3):
        policy.observe(0.2, WORK, batch, [], now=0.5)  # a batch above the cap is not the cap's doing
    assert policy.batch_cap == 6
    for _ in range(3):
        policy.observe(0.05, WORK, batch[:6], [], now=0.5)  # slack: one more a step
    assert policy.batch_cap == 9
    policy.observe(0.09, WORK, batch[:6], [], now=0.5)  # within the target but without slack: unchanged
    assert policy.batch_cap == 9


def test_slo_policy_ttft_breaches_grow_the_host_buffer():
    policy = SLOPolicy(StepCost(), host_budget=64 * MB, max_batched_tokens=512, max_num_seqs=32, min_prefill_tokens=16)
    for _ in range(3):
        policy.observe(0.2, WORK, [slo_request()], [], now=0.5)
    assert policy.host_buffer == 32 * MB
    late = [slo_request(arrival=0.0, ttft_slo=0.1)]
    for _ in range(3):
        policy.observe(0.01, WORK, [], late, now=0.5)
    assert policy.host_buffer == 64 * MB and policy.prefill_budget == 512


def test_slo_policy_orders_by_deadline_and_holds_back_lost_requests():
    policy = SLOPolicy(StepCost(), host_budget=0, max_batched_tokens=512, max_num_seqs=32, min_prefill_tokens=16)
    lost, later, sooner = slo_request(0.0, 0.1), slo_request(0.0, 2.0), slo_request(0.5, 1.0)
    decoding = slo_request(0.0, 1.0, first_token_time=0.4)
    assert policy.order([lost, later, sooner], [decoding], now=1.0) == [sooner, later]
    assert policy.order([lost, later, sooner], [], now=1.0) == [sooner, later, lost]
    missed = slo_request(0.0, 0.1, first_token_time=0.4)  # already lost: nothing to protect
    assert policy.order([lost, later], [missed], now=1.0) == [later, lost]
    preempted = slo_request(0.0, 0.1, first_token_time=0.05)  # TTFT met long ago, then preempted
    assert policy.order([lost, later, preempted], [decoding], now=1.0) == [preempted, later]


def test_slo_engine_admits_no_more_than_the_batch_cap(tiny_model):
    llm = tiny_engine(tiny_model, policy="slo")
    llm.scheduler.policy.slack = 0  # no step is fast enough to raise the cap
    llm.scheduler.policy.batch_cap = 2
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(5):
        llm.add_request([i + 1] * 5, params, ttft_slo=100.0, tpot_slo=100.0)
    while llm.has_unfinished_requests():
        llm.step()
        assert len(llm.scheduler.running) <= 2
    assert len(llm.metrics.requests) == 5
    assert_pool_empty(llm)


@pytest.mark.parametrize("bad", [dict(policy="lifo"), dict(preemption="drop"), dict(mode="dynamic")])
def test_bad_engine_arguments_leave_the_pool_untouched(tiny_model, bad):
    pool = Pool("host", budget_bytes=2 * MB, chunk_bytes=16 << 10)
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_engine(tiny_model, pool=pool, block_size=4, max_num_batched_tokens=32, **bad)
    assert pool.stats()["virtual_tensors"] == 0 and pool.mapped_device_bytes == 0


def test_kv_tail_shrinks_for_a_prefill_between_steps(tiny_model):
    """Elastic mode keeps the KV free tail mapped between steps and gives it back when a later prefill
    needs the room: nothing the engine holds across begin_step (views) may stop that shrink."""
    llm = tiny_engine(tiny_model, mode="elastic", budget_bytes=160 << 10, max_num_seqs=16)
    keeper = llm.add_request([1] * 4, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    llm.step()
    tail = llm.memory._blocks_within(llm.memory.device_room() - llm.memory.activation_room)  # all but the room kept
    llm.kv_cache.resize(tail)  # as if finished requests had left their blocks mapped
    assert llm.blocks.high_water < tail
    llm.add_request(list(range(1, 49)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    llm.step()  # its prefill's activations need the tail's room
    assert llm.kv_cache.num_blocks < tail and keeper in llm._requests
    while llm.has_unfinished_requests():
        llm.step()
    assert_pool_empty(llm)


def test_summary_counts_decode_throughput_and_the_prefill_riding_along():
    metrics = RunMetrics()
    row = dict(kv_bytes=0, activation_bytes=0, device_bytes=0, borrowed_bytes=0, swapped_bytes=0, swap_ins=0,
               swap_wait_seconds=0.0, overhead_seconds=0.0, memory_seconds=0.0)
    # a prefill alone (1 s), a prefill chunk with 4 decodes (3 s), then 4 decodes alone (1 s)
    for start, seconds, tokens, decodes in ((0, 1, 100, 0), (1, 3, 104, 4), (4, 1, 4, 4)):
        metrics.record_step(start=start, end=start + seconds, model_seconds=seconds, batch=decodes + (tokens > decodes),
                            decode_batch=decodes, tokens=tokens, decode_tokens=decodes, **row)
    summary = metrics.summary()
    assert summary["decode_tokens_per_s"] == 8 / 4
    assert summary["decode_time_with_prefill_pct"] == 75.0


def test_step_outputs_neither_decode_nor_copy_the_prompt(tiny_model):
    """Steps do not decode their outputs' text (a batch's whole outputs at every step); reading .text
    decodes it once. Every output of a request holds the same prompt list, not a copy per step."""
    class Tokenizer:
        calls = 0

        def decode(self, ids, skip_special_tokens):
            Tokenizer.calls += 1
            return " ".join(map(str, ids))

    llm = make_engine(tiny_model, tokenizer=Tokenizer(), budget_bytes=2 * MB, chunk_bytes=16 << 10)
    llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    outs = []
    while llm.has_unfinished_requests():
        outs += llm.step()
    assert Tokenizer.calls == 0
    assert outs[-1].text == " ".join(map(str, outs[-1].token_ids)) and outs[-1].text is outs[-1].text
    assert outs[2].text == " ".join(map(str, outs[-1].token_ids[:3]))
    assert Tokenizer.calls == 2
    assert outs[0].prompt_token_ids == [1, 2, 3] and all(o.prompt_token_ids is outs[0].prompt_token_ids for o in outs)


def test_memory_operations_are_counted_as_overhead(tiny_model):
    """A step's begin_step and end_step (mapping and unmapping) are engine overhead, reported apart as
    memory_seconds, and not model time."""
    llm = tiny_engine(tiny_model, mode="elastic")
    for name in ("begin_step", "end_step"):
        def slow(*args, _f=getattr(llm.memory, name), **kwargs):
            time.sleep(0.02)
            return _f(*args, **kwargs)
        setattr(llm.memory, name, slow)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
    for step in llm.metrics.steps:
        assert step["memory_seconds"] >= 0.04
        assert step["overhead_seconds"] >= step["memory_seconds"]
    summary = llm.metrics.summary()
    assert 0 < summary["memory_overhead_pct"] <= summary["overhead_pct"]


def test_unchunked_recompute_longer_than_a_step_still_runs(tiny_model):
    """chunked_prefill=False: a request preempted by recompute prefills its prompt and generated tokens
    again; once they are more than a step may run, that runs in chunks, or it could never run again."""
    rng = random.Random(0)
    prompts = [[rng.randrange(128) for _ in range(30)] for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=90, ignore_eos=True)
    roomy = tiny_engine(tiny_model, chunked_prefill=False, budget_bytes=8 * MB)
    want = [o.token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    roomy.close()
    llm = tiny_engine(tiny_model, chunked_prefill=False, budget_bytes=192 << 10)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    assert llm.metrics.summary()["preemptions"] > 0
    assert_pool_empty(llm)


def test_unchunked_prompt_longer_than_the_slo_prefill_budget_runs(tiny_model):
    """With chunked prefill off the SLO policy's prefill budget cannot split a prompt: a step's first
    prefill may exceed it (else a prompt longer than a shrunken budget would never run); later ones not."""
    llm = tiny_engine(tiny_model, policy="slo", chunked_prefill=False)
    llm.scheduler.policy.prefill_budget = 4
    outs = llm.generate([[7] * 24, [5] * 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [4, 4]
    assert llm.metrics.steps[0]["tokens"] == 24  # the second prompt waited for a step of its own
    assert_pool_empty(llm)


def test_the_cost_model_leaves_out_an_engines_first_step(tiny_model):
    """The first step pays for what runs once; steps of its kind may be rare enough to keep it in the
    model's window for long."""
    llm = tiny_engine(tiny_model)
    llm.add_request([3] * 8, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    llm.step()
    assert not llm.cost.history(True) and not llm.cost.history(False)
    llm.step()
    assert len(llm.cost.history(False)) == 1  # the decode
    llm.close()


def test_a_policy_that_wants_no_prefill_gets_none_even_unchunked(tiny_model, monkeypatch):
    """The SLO policy asks for no prefill while decodes may finish first; with chunked prefill off the
    exemption of a step's first prefill from the budget must not override that."""
    llm = tiny_engine(tiny_model, chunked_prefill=False)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm.add_request([3] * 8, params)
    llm.step()  # its prefill: it decodes from now on
    monkeypatch.setattr(llm.scheduler.policy, "prefill_tokens", lambda *args: 0)
    llm.add_request([5] * 8, params)
    llm.step()
    assert llm.metrics.steps[-1]["tokens"] == 1  # the decode alone
    monkeypatch.undo()
    while llm.has_unfinished_requests():
        llm.step()
    assert len(llm.metrics.requests) == 2
    assert_pool_empty(llm)


def test_a_failed_step_leaves_no_view_that_blocks_an_abort(tiny_model, monkeypatch):
    """The failed step's traceback would hold views of the KV cache; aborting the last request in the
    except block makes the engine idle and unmaps its KV, which a live view would refuse."""
    import torch_ellm.integrations.engine.model_runner as runner

    llm = tiny_engine(tiny_model)
    request = llm.add_request([1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    llm.step()

    def failing_attention(q, cache, layout, scale):
        raise RuntimeError("injected")

    monkeypatch.setattr(runner, "paged_attention", failing_attention)
    try:
        llm.step()
    except RuntimeError as e:
        assert "injected" in str(e)
        llm.abort(request)
    assert llm.kv_cache.num_blocks == 0 and all(vt.mapped_bytes == 0 for vt in llm.kv_cache.layers)
    assert_pool_empty(llm)


def test_kv_resize_refused_by_a_live_view_changes_nothing():
    pool = Pool("host", budget_bytes=1 * MB, chunk_bytes=16 << 10)
    kv = KVCache(pool, num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, max_blocks=64, dtype=torch.float32)
    kv.resize(40)
    mapped = [vt.mapped_bytes for vt in kv.layers]
    view = kv.views[1][:2]  # the second layer to shrink: the first has shrunk when it refuses
    with pytest.raises(ValueError, match="view"):
        kv.resize(0)
    assert kv.num_blocks == 40 and [vt.mapped_bytes for vt in kv.layers] == mapped
    assert kv.views[0].shape[0] == 40
    del view
    kv.resize(0)
    assert pool.stats()["mapped_device_bytes"] == 0
    kv.release()


def test_generate_counts_only_its_own_requests(tiny_model, monkeypatch):
    llm = tiny_engine(tiny_model)
    other = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    outs = llm.generate([[4, 5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(outs[0].token_ids) == 5 and not llm.has_unfinished_requests()  # the other one ran too

    def failing_run(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(llm.runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate([[4, 5, 6]], use_tqdm=False)
    assert not llm.has_unfinished_requests()  # a failed generate leaves nothing queued
    assert other not in llm._requests
    assert_pool_empty(llm)


def test_generate_that_fails_after_one_of_its_requests_finished(tiny_model, monkeypatch):
    """The step that raised had already finished one of generate's requests: the error is the step's,
    and the others are aborted."""
    llm = tiny_engine(tiny_model)
    record_step = llm.metrics.record_step

    def failing_record_step(**row):
        if 0 not in llm._requests:  # the 1-token request finished in this step
            raise RuntimeError("injected after the step")
        record_step(**row)

    monkeypatch.setattr(llm.metrics, "record_step", failing_record_step)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 20)]
    with pytest.raises(RuntimeError, match="injected after the step"):
        llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], params, use_tqdm=False)
    assert not llm.has_unfinished_requests() and llm.blocks.num_used == 0
    monkeypatch.setattr(llm.metrics, "record_step", record_step)
    assert_pool_empty(llm)


def test_a_cached_prefix_is_kept_when_only_the_step_lacks_room(tiny_model):
    """Chunked prefill off: a request preempted by recompute after outgrowing max_num_batched_tokens,
    whose prefix is still cached, waits for a step with room for the rest of it instead of dropping the
    cached blocks to run a small chunk (it would prefill all of them again)."""
    llm = tiny_engine(tiny_model, budget_bytes=8 * MB, chunked_prefill=False, max_num_seqs=64)
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    request = llm._requests[llm.add_request(list(range(1, 21)), params(80))]
    while len(request) < 41:
        llm.step()
    for i in range(30):
        llm.add_request([100 + i % 20], params(50))
    llm.step()
    llm.step()
    llm.scheduler._preempt(request)  # by recompute, as when a step does not fit
    assert len(request) > llm.scheduler.max_batched_tokens
    chunks = llm.scheduler.schedule()  # 30 decodes leave 2 tokens: not enough for its 3 past the cache
    assert request not in [seq for seq, _ in chunks] and request.num_computed == 0  # before: a 2-token chunk
    while llm.has_unfinished_requests():
        llm.step()
    assert len(request.output_token_ids) == 80
    assert_pool_empty(llm)


def test_an_out_of_memory_while_profiling_reaches_the_caller(tiny_model, monkeypatch):
    """The profiling run's traceback holds views of its scratch KV cache; releasing that cache must not
    replace the OutOfMemoryError with a complaint about live views (first seen on a GPU)."""
    import torch_ellm.integrations.engine.model_runner as runner

    def out_of_memory(q, cache, layout, scale):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(runner, "paged_attention", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        LLM(tiny_model, budget_bytes=2 * MB, chunk_bytes=16 << 10, block_size=4, max_num_batched_tokens=32)


@pytest.mark.parametrize("seed", [5, 79, 116, 288])
def test_tiny_budgets_with_borrowing_refuse_or_finish(seed):
    """Budgets of a few chunks, preemption by borrowing (seeds from a review's fuzzer): a request is refused
    by add_request or it finishes; step() never raises. The engine accepted prompts whose blocks could never
    be mapped beside a step's activations (with no KV yet there is nothing to borrow: step() raised 'no
    waiting request fits'), counted KV that a shrink unmaps from host memory as device room (an
    OutOfMemoryError mid-step), and admitted a prompt only whole, which recompute could grow past what the
    device holds."""
    rng = random.Random(seed)
    args = dict(mode=rng.choice(["static", "elastic"]), enable_prefix_caching=rng.random() < 0.6,
                preemption=rng.choice(["recompute", "swap", "borrow"]), block_size=rng.choice([2, 4, 8]),
                max_num_batched_tokens=rng.choice([16, 32, 64]), max_model_len=128,
                chunked_prefill=rng.random() < 0.8, chunk_bytes=rng.choice([4 << 10, 16 << 10]),
                max_num_seqs=rng.choice([4, 8, 64]),
                budget_bytes=rng.choice([96 << 10, 128 << 10, 192 << 10, 256 << 10, 512 << 10]),
                host_budget_bytes=rng.choice([0, 128 << 10, 512 << 10]))
    assert args["preemption"] == "borrow"
    if not args["chunked_prefill"]:
        args["max_num_batched_tokens"] = 128
    prefixes = [[rng.randrange(128) for _ in range(rng.randint(4, 40))] for _ in range(3)]
    requests = []
    for _ in range(rng.randint(10, 40)):
        arrival = rng.randint(0, 30)
        prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + [rng.randrange(128)
                                                                         for _ in range(rng.randint(1, 60))]
        prompt = prompt[:126]
        requests.append((arrival, prompt, rng.randint(1, min(80, 128 - len(prompt))), rng.randrange(1000),
                         rng.choice([0, 0.8])))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    llm = LLM(model, **args)
    pending, finished, ids, step = sorted(requests, key=lambda r: r[0]), set(), [], 0
    while pending or llm.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, prompt, max_tokens, sample_seed, temperature = pending.pop(0)
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=sample_seed, ignore_eos=True)
            try:
                ids.append(llm.add_request(prompt, params))
            except ValueError:
                pass  # could never run: refused, the engine unchanged
        finished |= {o.request_id for o in llm.step() if o.finished}
        step += 1
    assert finished == set(ids)  # (seed 79's static KV pool holds no chunk: every request is refused)
    assert_pool_empty(llm)


@pytest.mark.parametrize("case", ["block larger than a step", "static pool borrowed"])
def test_prompts_that_can_start_are_not_refused(case):
    """add_request's check for a prompt that could never start must not refuse one that can (a review found
    both): a block larger than max_num_batched_tokens (the smallest first step is the step limit, not a
    block), and static mode's fixed KV pool, which is on the device even when idle and may be borrowed."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    if case == "block larger than a step":
        args = dict(mode="elastic", block_size=16, max_num_batched_tokens=8, chunk_bytes=16 << 10,
                    budget_bytes=160 << 10)
    else:
        args = dict(mode="static", preemption="borrow", block_size=4, max_num_batched_tokens=16, chunk_bytes=4 << 10,
                    budget_bytes=160 << 10, host_budget_bytes=512 << 10, enable_prefix_caching=False)
    llm = LLM(model, max_model_len=256, **args)
    length = 105 if case == "block larger than a step" else (llm.memory.static_blocks + 4) * 4  # past the pool
    prompt = [i * 5 % 128 for i in range(length)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)
    roomy = LLM(model, budget_bytes=8 * MB, max_model_len=256)
    assert out[0].token_ids == roomy.generate([prompt], params, use_tqdm=False)[0].token_ids
    assert_pool_empty(llm)


def test_kv_resize_within_its_chunks_maps_nothing_and_keeps_kv():
    """Most steps move the high water by a block inside chunks already mapped: no driver call, the K/V
    stay, the views still end at num_blocks; a new chunk comes zeroed."""
    pool = Pool("host", budget_bytes=1 * MB, chunk_bytes=16 << 10)
    kv = KVCache(pool, num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, max_blocks=64, dtype=torch.float32)
    per_chunk = (16 << 10) // kv.block_bytes  # 16 blocks a chunk
    kv.resize(3)
    for view in kv.views:
        view.fill_(7.0)
    mapped = [vt.mapped_bytes for vt in kv.layers]
    calls = []
    for vt in kv.layers:
        vt.resize = lambda nbytes, resize=vt.resize: calls.append(nbytes) or resize(nbytes)
    kv.resize(per_chunk)
    assert [vt.mapped_bytes for vt in kv.layers] == mapped and not calls
    assert all(view.shape[0] == per_chunk and bool((view[:3] == 7).all()) for view in kv.views)
    kv.resize(2)
    assert [view.shape[0] for view in kv.views] == [2, 2] and [vt.mapped_bytes for vt in kv.layers] == mapped
    assert not calls
    for view in kv.views:
        view[1:].fill_(float("nan"))  # in the first chunk: a second chunk must not inherit anything from it
    kv.resize(per_chunk + 1)
    assert [vt.mapped_bytes for vt in kv.layers] == [2 * m for m in mapped]
    assert all(bool((view[per_chunk:] == 0).all()) and bool((view[0] == 7).all()) for view in kv.views)
    del view  # the loop's last view would keep the cache from being released
    kv.release()
    assert pool.stats()["mapped_device_bytes"] == 0


def test_kv_release_refused_by_a_live_view_leaves_a_working_cache():
    pool = Pool("host", budget_bytes=1 * MB, chunk_bytes=16 << 10)
    kv = KVCache(pool, num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, max_blocks=64, dtype=torch.float32)
    kv.resize(3)
    kv.views[1][2].fill_(5.0)
    held = kv.views[0]
    with pytest.raises(ValueError, match="view"):
        kv.release()
    del held
    kv.resize(4)  # within the mapped chunk
    kv.write(0, torch.tensor([12]), torch.ones(1, 2, 8), torch.ones(1, 2, 8))
    assert [view.shape[0] for view in kv.views] == [4, 4] and bool((kv.views[1][2] == 5).all())
    kv.release()
    assert pool.stats()["mapped_device_bytes"] == 0


def test_kv_shrink_refused_halfway_zeroes_the_chunks_it_maps_again():
    """The layers that shrank before a live view refused the next one map their top chunks again; those
    may come from anywhere (here: chunks another tenant filled with NaN) and must come back zeroed."""
    chunk = 16 << 10
    pool = Pool("host", budget_bytes=1 * MB, chunk_bytes=chunk)
    kv = KVCache(pool, num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, max_blocks=200, dtype=torch.float32)
    per_chunk = chunk // kv.block_bytes
    kv.resize(2 * per_chunk + 1)  # three chunks a layer
    held = kv.views[1][:1]  # the second layer refuses to shrink
    tenants, resize = [], kv.layers[1].resize

    def poison_then_resize(nbytes):  # between the first layer's shrink and its growing back
        for _ in range(2):
            other = pool.virtual_tensor(2 * chunk, tag="other")
            other.resize(2 * chunk)
            other.as_tensor((2 * chunk // 4,), torch.float32).fill_(float("nan"))
            tenants.append(other)
        tenants.pop(0).release()  # two NaN chunks back in the pool's cache, for the first layer to take
        return resize(nbytes)

    kv.layers[1].resize = poison_then_resize
    with pytest.raises(ValueError, match="view"):
        kv.resize(per_chunk)
    kv.layers[1].resize = resize
    del held
    assert kv.num_blocks == 2 * per_chunk + 1
    assert bool(torch.isfinite(kv.views[0]).all()) and bool(torch.isfinite(kv.views[1]).all())
    for other in tenants:
        other.release()
    kv.release()


def random_load(seed):
    """A review's fuzz case: engine arguments and requests (arrival step, prompt, max tokens, abort step),
    prompts drawing on three shared prefixes."""
    rng = random.Random(seed)
    args = dict(mode=rng.choice(["static", "elastic"]), enable_prefix_caching=rng.random() < 0.6,
                preemption=rng.choice(["recompute", "swap", "borrow", "auto"]), block_size=rng.choice([2, 4, 8]),
                max_num_batched_tokens=rng.choice([16, 32, 64]), max_model_len=128,
                chunked_prefill=rng.random() < 0.7, chunk_bytes=rng.choice([4 << 10, 16 << 10]),
                max_num_seqs=rng.choice([2, 4, 8, 64]),
                budget_bytes=rng.choice([96 << 10, 128 << 10, 160 << 10, 192 << 10, 256 << 10, 512 << 10]),
                host_budget_bytes=rng.choice([0, 128 << 10, 512 << 10]), policy=rng.choice(["fcfs", "fcfs", "slo"]))
    if not args["chunked_prefill"]:
        args["max_num_batched_tokens"] = rng.choice([64, 128])
    prefixes = [[rng.randrange(128) for _ in range(rng.randint(4, 40))] for _ in range(3)]
    requests = []
    for _ in range(rng.randint(6, 30)):
        prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + [rng.randrange(128) for _ in range(rng.randint(1, 60))]
        prompt = prompt[:120]
        if args["policy"] == "slo":
            rng.choice([0.01, 0.05, 0.5]), rng.choice([0.002, 0.01, 0.1])  # targets, unused here
        requests.append((rng.randint(0, 25), prompt, rng.randint(1, min(40, 128 - len(prompt))),
                         rng.randint(0, 40) if rng.random() < 0.1 else None))
    return args, sorted(requests, key=lambda r: r[0])


def serve_load(llm, requests, after_step=lambda: None):
    """Serve random_load's requests on llm step by step, calling after_step() after each step; then check
    that nothing leaked and close llm. Returns (outputs of the finished, steps taken)."""
    pending, step, done = list(enumerate(requests)), 0, {}
    while pending or llm.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, max_tokens, _) = pending.pop(0)
            with contextlib.suppress(ValueError):  # one the budget could never hold
                llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                                request_id=i)
        for i, (_, _, _, abort_at) in enumerate(requests):
            if abort_at == step and i in llm._requests:
                llm.abort(i)
        done.update((o.request_id, o.token_ids) for o in llm.step() if o.finished)
        step += 1
        after_step()
    assert_pool_empty(llm)
    llm.close()  # again: nothing happens
    return done, step


@pytest.mark.filterwarnings("ignore:preemption=.* but the pool has no host budget")  # seed 1035's load
@pytest.mark.parametrize("seed", [28, 34, 1002, 1035])
def test_prefill_first_on_loads_a_review_found(seed):
    """Loads from a review's fuzz. 34 and 1035: a first pass admitted a request whose prefix cache left it
    one token, which the decode pass then preempted with its chunk still in the step (IndexError); it
    now waits for the decode pass. 28: a prompt's one-token chunk, which runs as a decode, let the decode
    pass run and preempt it likewise. 1002: prefill crawled in chunks of 2-3 tokens for 2,035 steps (123
    by default) while the waiting decodes held the memory; after a step that memory cut short, they now
    run first. Outputs are the default scheduling's, nothing leaks."""
    model = small_llama(256)
    args, requests = random_load(seed)
    (default, default_steps), (first, steps) = (serve_load(LLM(model, prefill_first=prefill_first, **args), requests)
                                                for prefill_first in (False, True))
    aborted = {i for i, request in enumerate(requests) if request[3] is not None}  # they may finish first
    assert set(first) ^ set(default) <= aborted
    assert all(first[i] == default[i] for i in set(first) & set(default))
    assert steps < 2 * default_steps


def test_prefill_first_brings_swapped_decodes_back_past_a_refused_prompt():
    """A fuzzed load, scheduled without timings (FCFS, swap): a prompt the first pass could not admit must
    not keep the decode pass from bringing back requests swapped out while decoding (with the refusal
    counted as memory cutting a request short they waited up to 157 steps; 9 now). Each step records the
    swap space it held."""
    args, requests = random_load(540)
    llm = LLM(small_llama(256), prefill_first=True, **{**args, "host_budget_bytes": 512 << 10, "policy": "fcfs",
                                                       "preemption": "swap", "enable_prefix_caching": False})
    held_during, swapped, waits = [], {}, []
    run = llm.runner.run
    llm.runner.run = lambda *a, **k: (run(*a, **k), held_during.append(llm.pool.host_buffer_bytes))[0]

    def count_waits():
        for request_id, seq in llm._requests.items():
            if llm.swap.holds(seq) and seq.num_output_tokens:
                swapped[request_id] = swapped.get(request_id, 0) + 1
        waits.extend(swapped.pop(r) for r in list(swapped)
                     if r not in llm._requests or not llm.swap.holds(llm._requests[r]))

    serve_load(llm, requests, count_waits)
    assert waits and max(waits) <= 30
    assert [s["swapped_bytes"] for s in llm.metrics.steps] == held_during


@pytest.mark.parametrize("budget, prefill_first", [(160 << 10, False), (192 << 10, True)])
def test_no_prompt_joins_one_that_memory_cut_short(tiny_model, budget, prefill_first):
    """Eight prompts at once into a budget that cuts their prefill chunks: once memory refuses a request
    tokens in a step, no newcomer is admitted beside it, to be preempted for its room and prefilled again
    (these loads preempted 2 and 1 times before)."""
    llm = tiny_engine(tiny_model, mode="elastic", budget_bytes=budget, prefill_first=prefill_first)
    rng = random.Random(0)
    for _ in range(8):
        llm.add_request([rng.randrange(128) for _ in range(rng.randint(40, 60))],
                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while llm.has_unfinished_requests():
        llm.step()
    assert llm.scheduler.num_preemptions == 0
    assert_pool_empty(llm)


@pytest.mark.parametrize("seed", [14, 33, 40, 51, 75])
def test_prefill_first_brings_swapped_requests_back_in_decode_steps(tiny_model, seed):
    """Random loads that preempt by swapping (cases a fuzz found): a request back from swap with all but
    its last token decodes in a decode step, never beside a prompt's prefill, and every output is what
    the default scheduling gives."""
    outputs = {}
    for prefill_first in (False, True):
        rng = random.Random(seed)
        llm = tiny_engine(tiny_model, preemption="swap", block_size=rng.choice([2, 4]), budget_bytes=256 << 10,
                          host_budget_bytes=512 << 10, prefill_first=prefill_first)
        arrivals = sorted((rng.randint(0, 20), [rng.randrange(128) for _ in range(rng.randint(1, 60))],
                           rng.randint(1, 40)) for _ in range(rng.randint(10, 30)))
        mixed, ids, step = [], [], 0
        schedule = llm.scheduler.schedule

        def checked():
            chunks = schedule()
            # A chunk of one token, a prompt's last or all that fits, runs as a decode does: not a prefill here.
            if any(n > 1 for _, n in chunks):
                mixed.extend(seq for seq, n in chunks if seq.output_token_ids and seq.num_uncomputed == 1)
            return chunks

        llm.scheduler.schedule = checked
        while arrivals or llm.has_unfinished_requests():
            while arrivals and arrivals[0][0] <= step:
                _, prompt, max_tokens = arrivals.pop(0)
                ids.append(llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                  ignore_eos=True)))
            for out in llm.step():
                outputs.setdefault(prefill_first, {})[out.request_id] = out.token_ids
            step += 1
        assert llm.metrics.summary()["swap_ins"] > 0
        assert not mixed or not prefill_first
        llm.close()
    assert outputs[True] == outputs[False]
