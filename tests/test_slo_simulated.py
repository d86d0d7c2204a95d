"""The SLO policy against FCFS on a simulated clock, so that bursts are timed without noise. The engine's
scheduler, memory, cost model and policy run as they do; the model does not run: each step takes the
seconds a fixed cost function gives its work, with seeded jitter, the coefficients fitted to real steps
on the 2-core CPU VM (bench/engine.py's model, bursty runs of both policies): 2.76 ms a step, 69 us a
token, 0.13 us an attention pair, 43 us a prefill chunk, 120 us a decode, plus what the engine's model lacks: decodes attend as one
padded batch, each to the longest context. The load is the bench's: bursts of 8 requests at static/FCFS's
capacity (full) and at half of it, targets 10x a lone request's TTFT and 3x its TPOT."""
import random
import statistics
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torch_ellm.integrations.engine import llm as llm_module, scheduler, sequence, swap
from torch_ellm.integrations.engine.attention import is_decode
from torch_ellm.integrations.engine.llm import LLM
from torch_ellm.integrations.engine.sampling_params import SamplingParams
from torch_ellm.integrations.engine.step_cost import step_work

FIXED, PER_TOKEN, PER_PAIR, PER_PREFILL, PER_DECODE = 2.76e-3, 6.9e-5, 1.3e-7, 4.3e-5, 1.2e-4
SCHEDULING = 2e-4  # seconds of engine work a step, outside the model
MAX_LEN = 1024


def engine_args(max_len=MAX_LEN):
    return dict(max_model_len=max_len, max_num_batched_tokens=max_len, block_size=16, max_num_seqs=64)


BUDGETS = {}


def budget(model, max_len=MAX_LEN):
    """As the bench sizes a stack: static mode's activation reserve for a whole step plus KV for 4 full
    contexts, so static's batch is bounded by memory and full load saturates it."""
    if (id(model), max_len) not in BUDGETS:
        probe = LLM(model, mode="elastic", budget_bytes=1 << 30, **engine_args(max_len))
        per_token = probe.kv_cache.block_bytes * len(probe.kv_cache.layers) // 16
        BUDGETS[id(model), max_len] = probe.memory.peak_activation_bytes + 4 * max_len * per_token
        probe.close()
    return BUDGETS[id(model), max_len]


def seconds(work):
    return (FIXED + PER_TOKEN * work.tokens + PER_PAIR * work.pairs + PER_PREFILL * work.prefills
            + PER_DECODE * work.decodes)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2 * MAX_LEN)  # the bench's
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    for module in (llm_module, scheduler, sequence, swap):
        monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    return clock


def serve(model, clock, mode, policy, requests, seed, max_len=MAX_LEN, borrow=None):
    """Serve (arrival, prompt length, output length, ttft, tpot) requests on the simulated clock: the run's
    summary. borrow: (seconds that reading a borrowed byte costs the simulated device, what the engine is
    told it costs): preemption by borrowing, with a host budget of half the device's."""
    options = dict(preemption="borrow", host_budget_bytes=budget(model, max_len) // 2) if borrow else {}
    with pytest.MonkeyPatch.context() as patch:  # the engine measures the simulated device, not this one
        patch.setattr(llm_module, "host_read_seconds", lambda pool: borrow[1])
        llm = LLM(model, mode=mode, policy=policy, budget_bytes=budget(model, max_len), **engine_args(max_len),
                  **options)
    jitter, tokens = random.Random(seed), random.Random(seed + 1)
    per_borrowed_byte = borrow[0] if borrow else 0.0

    def run(chunks, kv_cache, before_layer=None):
        # Decodes attend as one padded batch: a cost the engine's model (pairs summed) does not have.
        contexts = [seq.num_computed + 1 for seq, n in chunks if is_decode(seq, n)]
        padding = PER_PAIR * (len(contexts) * max(contexts, default=0) - sum(contexts))
        borrowed = per_borrowed_byte * kv_cache.host_bytes
        clock.now += (seconds(step_work(chunks)) + padding + borrowed) * max(0.3, jitter.gauss(1, 0.1))
        return torch.zeros(len(chunks), model.config.vocab_size)

    llm.runner.run = run
    start, pending = clock.now, sorted(requests)
    while pending or llm.has_unfinished_requests():
        while pending and start + pending[0][0] <= clock.now:
            arrival, prompt, output, ttft, tpot = pending.pop(0)
            ids = [tokens.randrange(model.config.vocab_size) for _ in range(prompt)]
            llm.add_request(ids, SamplingParams(temperature=0, max_tokens=output, ignore_eos=True),
                            ttft_slo=ttft, tpot_slo=tpot, arrival=start + arrival)
        if llm.has_unfinished_requests():
            clock.now += SCHEDULING
            llm.step()
        else:
            clock.now = max(clock.now, start + pending[0][0])
    summary = llm.metrics.summary()
    summary["borrowed_bytes_total"] = llm.pool.stats()["borrowed_bytes_total"]
    llm.close()
    return summary


def attainments(model, clock, seed):
    """{(load, policy): SLO attainment} for one seeded set of 64 bursty requests."""
    rng = random.Random(seed)
    lengths = [(rng.randint(32, MAX_LEN // 3), rng.randint(8, 32)) for _ in range(64)]
    lone = MAX_LEN // 6
    ttft = 10 * seconds(SimpleNamespace(tokens=lone, pairs=lone * (lone + 1) // 2, prefills=1, decodes=0))
    tpot = 3 * seconds(SimpleNamespace(tokens=1, pairs=lone + 1, prefills=0, decodes=1))
    all_at_once = [(0.0, *length, None, None) for length in lengths]
    wall = serve(model, clock, "static", "fcfs", all_at_once, seed)["wall_seconds"]
    out = {}
    for load, gap in (("full", 8 * wall / 64), ("half", 16 * wall / 64)):
        requests = [(gap * (1 + i // 8) + rng.random() * 0.1 * gap, *length, ttft, tpot)
                    for i, length in enumerate(lengths)]
        for policy in ("fcfs", "slo"):
            out[load, policy] = serve(model, clock, "elastic", policy, requests, seed)["slo_attainment"]
    return out


def test_slo_policy_meets_more_targets_than_fcfs_under_bursts(model, clock):
    runs = [attainments(model, clock, seed) for seed in range(4)]
    mean = {key: statistics.mean(run[key] for run in runs) for key in runs[0]}
    # Full load: FCFS's batches slow every decode past its TPOT; the policy keeps what it can in time.
    assert mean["full", "slo"] >= 2 * mean["full", "fcfs"]
    # Half load: FCFS loses a burst's first requests on TPOT. The policy lets them decode first where the
    # prompts can wait, and takes whole prefill steps where the decodes can absorb them.
    # (0.90 against 0.84 over 12 seeds, above FCFS for 11, level for 1; full load 0.72 against 0.22.)
    assert mean["half", "slo"] >= mean["half", "fcfs"] + 0.03


def long_prompts(seed, max_len):
    """The bench's long-prompt workload: 24 prompts of 60-90% of the context, 4-16 output tokens, at once."""
    rng = random.Random(seed)
    return [(0.0, rng.randint(max_len * 6 // 10, max_len * 9 // 10), rng.randint(4, 16), None, None)
            for _ in range(24)]


def test_the_slo_policy_borrows_only_where_reading_host_memory_pays(model, clock):
    """Long prompts, no targets. Where reading borrowed KV costs about nothing (the CPU), the SLO policy
    borrows and runs larger batches than FCFS. Where it costs what PCIe does relative to a step (here
    1 ns a byte: the ~16 MiB of KV on the device would take 6 times a step's 2.76 ms fixed part, about the
    ratio on the H100 run), borrowing slows every step more than the larger batch gains: priced, the
    policy borrows nothing and takes no longer than FCFS; told it is free, it borrows and takes longer."""
    max_len = 2 * MAX_LEN
    for seed in range(2):
        requests = long_prompts(seed, max_len)
        run = lambda policy, borrow=None: serve(model, clock, "elastic", policy, requests, seed, max_len, borrow)
        fcfs = run("fcfs")
        free = run("slo", (0.0, 0.0))
        assert free["borrowed_bytes_total"] > 0 and free["max_batch"] > fcfs["max_batch"]
        priced = run("slo", (1e-9, 1e-9))
        assert priced["borrowed_bytes_total"] == 0 and priced["wall_seconds"] <= 1.01 * fcfs["wall_seconds"]
        unpriced = run("slo", (1e-9, 0.0))
        assert unpriced["borrowed_bytes_total"] > 0 and unpriced["wall_seconds"] > priced["wall_seconds"]
