"""The SLO policy's step cost model: fitted online, coefficients kept non-negative, and the prefill
budget it gives beside decodes with TPOT targets."""
from types import SimpleNamespace

import pytest

from torch_ellm.integrations.engine.linear_fit import LinearFit
from torch_ellm.integrations.engine.sampling_params import SamplingParams
from torch_ellm.integrations.engine.policy import SLOPolicy
from torch_ellm.integrations.engine.sequence import Sequence
from torch_ellm.integrations.engine.step_cost import StepCost, StepWork, step_work


def test_step_work_counts_tokens_and_attention_pairs():
    prefill = SimpleNamespace(num_computed=0)
    chunk = SimpleNamespace(num_computed=32)
    decode = SimpleNamespace(num_computed=99)
    # 10 fresh tokens: 55 causal pairs; 8 after 32: 8*32 + 36; 1 after 99: 100
    assert step_work([(prefill, 10), (chunk, 8), (decode, 1)]) == (19, 55 + 292 + 100, 1, 2, 0)  # borrowed: the engine's


def test_fit_recovers_a_linear_cost_and_predicts():
    cost = StepCost(min_steps=4)
    # 2 ms a step, 100 us a token, 0.2 us a pair, 0.5 ms a prefill chunk, 300 us more a decode
    def truth(tokens, pairs, decodes=0, prefills=0):
        return 0.002 + 1e-4 * tokens + 2e-7 * pairs + 5e-4 * prefills + 3e-4 * decodes

    for tokens, pairs, decodes, prefills in [(1, 50, 1, 0), (8, 900, 8, 0), (64, 3000, 0, 1), (200, 20000, 4, 2),
                                             (16, 100_000, 16, 0), (300, 45_000, 0, 3), (40, 800, 8, 1)]:
        cost.observe(StepWork(tokens, pairs, decodes, prefills), truth(tokens, pairs, decodes, prefills))
    assert cost.ready
    assert cost.predict(100, 5000, decodes=4, prefills=2) == pytest.approx(truth(100, 5000, 4, 2), rel=1e-6)
    assert cost.decode_seconds(12, 5000) == pytest.approx(truth(12, 5000, decodes=12), rel=1e-6)
    assert cost.extra_seconds(100, 5000) == pytest.approx(truth(100, 5000, prefills=1) - truth(0, 0), rel=1e-6)
    limit = cost.max_prefill(8, 8000, 0, 0.02, 1024)  # the most fresh tokens beside 8 decodes within 20 ms
    fits = lambda n, context: truth(8 + n, 8000 + n * context + n * (n + 1) // 2, decodes=8, prefills=1) <= 0.02
    assert fits(limit, 0) and not fits(limit + 1, 0)
    later = cost.max_prefill(8, 8000, 3000, 0.02, 1024)  # the same, 3000 tokens into a prompt
    assert later < limit and fits(later, 3000) and not fits(later + 1, 3000)
    # Prompts of 10 tokens: every 10 tokens one more chunk, each 0.5 ms of its own.
    chunks = lambda n: -(-n // 10)
    fits_short = lambda n: truth(8 + n, 8000 + n * (n + 1) // 2, decodes=8, prefills=chunks(n)) <= 0.02
    short = cost.max_prefill(8, 8000, 0, 0.02, 1024, [10] * 100)
    assert short < limit and fits_short(short) and not fits_short(short + 1)
    contexts = [900, 40, 3000, 7, 1200, 500, 64, 2000] * 4
    count = cost.max_decodes(contexts, 0.006)  # decodes in order, each one token after its context
    assert 1 < count < len(contexts)
    assert truth(count, sum(contexts[:count]), count) <= 0.006 < truth(count + 1, sum(contexts[:count + 1]), count + 1)
    assert cost.max_decodes([10 ** 6], 0.006) == 1  # the first always runs, whatever it costs
    chunk = SimpleNamespace(num_uncomputed=100, num_computed=300)  # 100 tokens after 300, steps of 512
    share = truth(0, 0) * 100 / 512
    assert cost.prefill_seconds([chunk], 512) == pytest.approx([cost.extra_seconds(100, 100 * 300 + 5050) + share])


def test_a_long_decode_only_stretch_keeps_the_prefill_costs():
    """In decode-only steps tokens equal decodes and no prefill runs: a window of those alone cannot
    tell the costs apart. Steps with prefill keep a window of their own."""
    cost = StepCost()
    truth = lambda w: 2.2e-3 + 5.9e-5 * w.tokens + 2.2e-7 * w.pairs + 8.4e-4 * w.prefills + 2.5e-4 * w.decodes
    mixed = [StepWork(300, 40_000, 4, 2), StepWork(512, 130_000, 0, 1), StepWork(70, 9000, 6, 1),
             StepWork(8, 1600, 8, 0), StepWork(16, 4000, 16, 0), StepWork(129, 20_000, 1, 1)] * 4
    for work in mixed + [StepWork(n, 300 * n, n, 0) for n in (8, 9, 10, 11) * 50]:
        cost.observe(work, truth(work))
    prefill = StepWork(512, 512 * 513 // 2, 0, 1)
    assert cost.predict(prefill.tokens, prefill.pairs, prefills=1) == pytest.approx(truth(prefill), rel=1e-3)
    assert cost.decode_seconds(12, 3600) == pytest.approx(truth(StepWork(12, 3600, 12, 0)), rel=1e-3)


def test_the_fit_does_not_depend_on_when_it_is_asked():
    """Refits come every `refit` observations whether or not anyone asks between them: a caller that
    skips asking for some steps (the policy, between bursts) must not move what the others are told."""
    noisy = [(StepWork(t, t * 40, t % 5, 1 + t % 2), 1e-3 + 6e-5 * t + 1e-4 * (t % 7)) for t in range(8, 60, 3)]
    asked, skipped = StepCost(), StepCost()
    for i, (work, seconds) in enumerate(noisy):
        asked.observe(work, seconds)
        skipped.observe(work, seconds)
        if asked.ready:
            asked.coefficients()
        if i == 12:
            assert skipped.coefficients() == asked.coefficients()
    assert skipped.coefficients() == asked.coefficients()


def test_a_fit_asked_before_its_first_refit_does_not_depend_on_when_either():
    """Before the first refit point the answer follows every observation: asking early fixes nothing."""
    asked, skipped = LinearFit(2, 64, 1, 4), LinearFit(2, 64, 1, 4)
    for i in range(9):
        for fit in (asked, skipped):
            fit.add((1, i % 3), 0.1 + 0.05 * (i % 3) + 0.01 * i)
        if i == 1:
            early = asked.coefficients()
        if i == 2:
            assert asked.coefficients() == skipped.coefficients() != early
    assert asked.coefficients() == skipped.coefficients()


def test_a_fit_no_one_asks_is_never_solved(monkeypatch):
    """FCFS asks nothing of the cost model: its steps pay for the running sums, not for solves."""
    solves = []
    fit = LinearFit._fit
    monkeypatch.setattr(LinearFit, "_fit", lambda self, *sums: solves.append(1) or fit(self, *sums))
    cost = StepCost()
    for t in range(100):
        cost.observe(StepWork(t, t * 40, t % 5, 1 + t % 2), 1e-3 + 6e-5 * t)
    assert solves == []
    cost.coefficients()
    cost.coefficients()
    assert solves == [1]


def test_a_feature_that_fits_negative_is_dropped():
    cost = StepCost(min_steps=1, refit=1)
    for tokens, pairs, seconds in [(10, 1000, 0.02), (20, 100, 0.03), (40, 50, 0.05), (5, 4000, 0.01)]:
        cost.observe(StepWork(tokens, pairs, 0), seconds)  # more pairs, less time: noise the model must not believe
    coef = cost.coefficients()
    assert min(coef) >= 0 and coef[2] == 0
    assert cost.max_prefill(0, 0, 0, 10.0, 512) == 512  # everything fits a generous step


def test_borrowed_bytes_are_priced_as_measured_and_left_out_of_the_fit():
    cost = StepCost(min_steps=4, borrowed_byte_seconds=1e-10)  # 10 GB/s across PCIe, say
    truth = lambda w: 0.002 + 1e-4 * w.tokens + 3e-4 * w.decodes + 1e-10 * w.borrowed
    # Borrowing with the batch, as it goes: a fit of its own would split that arbitrarily.
    for n in (1, 2, 4, 8, 16, 24, 32, 3):
        work = StepWork(n, 100 * n, n, 0, borrowed=max(0, n - 8) * (16 << 20))
        cost.observe(work, truth(work))
    assert cost.predict(12, 1200, decodes=12) == pytest.approx(truth(StepWork(12, 1200, 12)), rel=1e-6)
    assert cost.fixed_seconds() == pytest.approx(0.002, rel=1e-6)
    assert cost.borrowed_seconds(1 << 30) == pytest.approx(0.1073741824)
    # KV borrowed as the next step is planned: every step pays for reading it, decodes alone too.
    alone, extra = cost.max_decodes([100] * 64, 0.02), cost.extra_seconds(12, 1200)
    cost.borrowed_now = 64 << 20  # 6.7 ms
    assert cost.decode_seconds(12, 1200) == pytest.approx(truth(StepWork(12, 1200, 12, 0, 64 << 20)), rel=1e-6)
    assert cost.extra_seconds(12, 1200) == pytest.approx(extra)  # the step pays it, not what a prefill adds
    assert cost.max_decodes([100] * 64, 0.02) < alone


def request(prompt, tpot_slo=0.01, ttft_slo=1.0, arrival=0.0):
    return Sequence(0, [1] * prompt, SamplingParams(temperature=0, max_tokens=20), ttft_slo=ttft_slo,
                    tpot_slo=tpot_slo, arrival=arrival)


def decoding(first_token_time, outputs=3, **kwargs):
    seq = request(20, **kwargs)
    for _ in range(outputs):
        seq.append(7, first_token_time)
    seq.num_computed = len(seq) - 1
    return seq


def fitted_policy():
    """A policy whose model has learned: 1 ms a step plus 50 us a token, attention too cheap to see."""
    policy = SLOPolicy(StepCost(), host_budget=0, max_batched_tokens=512, max_num_seqs=32, min_prefill_tokens=16)
    for tokens in (1, 4, 16, 64, 128, 256, 4, 32):
        observe(policy, 0.001 + 5e-5 * tokens, StepWork(tokens, 0, 0), [], [], now=1.0)
    return policy


def observe(policy, seconds, work, decoding, waiting, now):
    """What the engine does after a step: feed the cost model it shares with the policy, then the policy."""
    policy.cost.observe(work, seconds)
    policy.observe(seconds, work, decoding, waiting, now)


def test_prefill_fills_the_step_up_to_the_tightest_tpot_target():
    policy = fitted_policy()
    running = [decoding(first_token_time=1.0, outputs=1) for _ in range(3)]
    running += [decoding(first_token_time=1.0, outputs=1, tpot_slo=0.02)]
    queue = [request(5000, ttft_slo=0.3, arrival=1.0)]  # 260 ms in whole steps: no time to wait for the decodes
    # 0.8 * 10 ms = 1 ms fixed + 50 us for each of the 4 decodes and each prefill token
    assert policy.prefill_tokens(512, running, queue, now=1.0) == (0.008 - 0.001) / 5e-5 - 4
    tight = [decoding(first_token_time=1.0, outputs=1, tpot_slo=0.0012)]  # met alone, with no slack to spare
    assert policy.prefill_tokens(512, tight, queue, now=1.0) == 16  # always some progress


def test_a_decode_ahead_of_its_target_lets_more_prefill_in_and_one_that_cannot_meet_it_none():
    policy, queue = fitted_policy(), [request(5000, ttft_slo=0.3, arrival=1.0)]
    fresh = policy.prefill_tokens(512, [decoding(first_token_time=1.0, outputs=1)], queue, now=1.0)
    # 10 tokens in no time: 19 * 10 ms for the last 10, 19 ms a step; 0.8 of it = 1 ms + 50 us a token
    ahead = policy.prefill_tokens(512, [decoding(first_token_time=1.0, outputs=10)], queue, now=1.0)
    assert fresh == round((0.008 - 0.001) / 5e-5) - 1 and ahead == int((0.8 * 0.019 - 0.001) / 5e-5) - 1
    behind = decoding(first_token_time=1.0, outputs=2)  # 18 tokens left in 10 ms: less than a decode takes
    assert policy.prefill_tokens(512, [behind], queue, now=1.18) == 512


@pytest.mark.parametrize("tpot, trade, full_step", [(0.01, 4, True), (0.003, 1, True), (0.003, 4, False)])
def test_prefill_takes_the_whole_step_when_that_saves_enough_first_tokens_per_decode_it_harms(tpot, trade, full_step):
    """Eight 100-token prompts due in 45 ms: in whole steps (1 ms + 50 us a token) all make it, by 6 to 41
    ms. A decode with a 10 ms TPOT target and 19 tokens to go has 170 ms to spare beyond its own steps:
    whole steps of prefill cannot push it past its target, so the step takes them. With a 3 ms target it
    has 37 ms, less than the 41 ms of prefill; at its pace (27 tokens a 2.4 ms step) the last four prompts
    miss. Four first tokens saved outweigh one decode if one is worth one (trade 1), not if a decode is
    worth four."""
    policy = fitted_policy()
    policy.trade = trade
    prompts = [request(100, ttft_slo=0.045, arrival=1.0) for _ in range(8)]
    room = policy.prefill_tokens(1024, [decoding(first_token_time=1.0, outputs=1, tpot_slo=tpot)], prompts, now=1.0)
    assert room == (1024 if full_step else 27)


def test_batch_is_as_large_as_the_model_predicts_decodes_within_the_tpot_target():
    policy = fitted_policy()
    running = [decoding(first_token_time=1.0, tpot_slo=0.00165) for _ in range(3)]
    queue = [request(20, arrival=1.0) for _ in range(20)]
    assert policy.max_running(64, running, queue) == 6  # 0.8 * 1.65 ms = 1 ms + 50 us * 6.4
    assert policy.max_running(4, running, queue) == 4
    assert policy.max_running(64, [], queue) == len(queue)  # their 10 ms targets hold them all
    policy.batch_cap = 2
    assert policy.max_running(64, [], []) == 2  # nothing to judge by: the cap
    hopeless = [decoding(first_token_time=1.0, tpot_slo=0.001) for _ in range(3)]  # one decode takes 1.05 ms
    assert policy.max_running(64, hopeless, queue) == 2


def test_prefill_budget_falls_back_without_model_or_decodes_at_stake():
    policy = SLOPolicy(StepCost(), host_budget=0, max_batched_tokens=512, max_num_seqs=32, min_prefill_tokens=16)
    policy.prefill_budget = 256
    running, queue = [decoding(first_token_time=1.0)], [request(5000, arrival=1.0)]
    assert policy.prefill_tokens(512, running, queue, now=1.0) == 256  # not fitted yet
    policy = fitted_policy()
    policy.prefill_budget = 256
    late = decoding(first_token_time=5.0)  # first token after its 1 s TTFT target: lost anyway
    assert policy.prefill_tokens(512, [late], queue, now=6.0) == 512  # the halved budget was a stand-in


def test_slow_steps_with_prefill_are_tpot_breaches_only_if_their_decodes_alone_are_too_slow():
    policy = fitted_policy()  # 12 decodes alone: 1 ms + 12 * 50 us
    relaxed = [decoding(first_token_time=1.0, tpot_slo=0.01) for _ in range(12)]
    for _ in range(5):
        observe(policy, 0.02, StepWork(300, 0, 12), relaxed, [], now=1.0)  # slow from the prefill it chose
    assert policy.batch_cap == 32 and policy.host_buffer == 0
    tight = [decoding(first_token_time=1.0, tpot_slo=0.001) for _ in range(12)]
    for _ in range(3):
        observe(policy, 0.02, StepWork(300, 0, 12), tight, [], now=1.0)  # the batch alone misses 1 ms
    assert policy.batch_cap == 6


def test_prompts_with_time_to_spare_wait_for_the_decodes_to_finish():
    """One decode with 19 tokens to go: some 20 ms of decode-only steps. A 5000-token prompt due in 1 s
    (260 ms in whole steps) waits for it: no prefill at all. Due in 300 ms it cannot wait: it is chunked
    in beside the decode. Nor while a preempted request waits: its TPOT runs on."""
    policy = fitted_policy()
    running = [decoding(first_token_time=1.0, outputs=1)]
    assert policy.prefill_tokens(512, running, [request(5000, ttft_slo=1.0, arrival=1.0)], now=1.0) == 0
    assert policy.prefill_tokens(512, running, [request(5000, ttft_slo=0.3, arrival=1.0)], now=1.0) > 16
    preempted = decoding(first_token_time=0.9, outputs=3)
    preempted.num_computed = 0
    assert policy.prefill_tokens(512, running, [preempted, request(5000, ttft_slo=1.0, arrival=1.0)], now=1.0) > 16
    many = [decoding(first_token_time=1.0, outputs=1) for _ in range(4)]
    for seq in many:
        seq.params = SamplingParams(temperature=0, max_tokens=4000)  # ~4 s of decodes: the prompt cannot wait
    assert policy.prefill_tokens(512, many, [request(5000, ttft_slo=1.0, arrival=1.0)], now=1.0) > 0


def test_admission_drops_the_longest_prompt_where_the_queue_runs_late():
    """1 ms a step, 50 us a token, 512 tokens a step: 200 tokens take 10.4 ms, 600 take 31.2 ms. Earliest
    deadline first, B would end at 41.6 ms, past its 40 ms, and C at 52 ms, past its 45: one in time. Without
    B, A and C both are: B goes last, and not at all while a decode with targets runs."""
    policy = fitted_policy()
    a, b, c = (request(n, ttft_slo=due, arrival=1.0) for n, due in ((200, 0.030), (600, 0.040), (200, 0.045)))
    assert policy.order([c, b, a], [], now=1.0) == [a, c, b]
    assert policy.order([c, b, a], [decoding(first_token_time=1.0)], now=1.0) == [a, c]
    unfitted = SLOPolicy(StepCost(), host_budget=0, max_batched_tokens=512, max_num_seqs=32, min_prefill_tokens=16)
    assert unfitted.order([c, b, a], [], now=1.0) == [a, b, c]  # no model: deadline order
    # 600 tokens due in 50 ms after two of 200: late, dropped; unless only the first 2 * max_num_seqs
    # are judged (no step admits more), where it keeps its place.
    d = request(600, ttft_slo=0.050, arrival=1.0)
    e = request(200, ttft_slo=0.045, arrival=1.0)
    running = [decoding(first_token_time=1.0)]
    assert policy.order([d, e, a], running, now=1.0) == [a, e]
    policy.max_batch = 1
    assert policy.order([d, e, a], running, now=1.0) == [a, e, d]


def test_a_preempted_request_prefilling_again_is_never_held_back():
    """Preempted by recompute and admitted again, a request that had its first token prefills its tokens
    once more while its TPOT runs on: no waiting for the decodes beside it, even with nothing queued."""
    policy = fitted_policy()
    long_decode = decoding(first_token_time=1.0, outputs=1)
    long_decode.params = SamplingParams(temperature=0, max_tokens=500)
    again = decoding(first_token_time=0.9, outputs=5)
    again.num_computed = 8  # its first chunk done, 17 tokens to go
    assert policy.prefill_tokens(512, [long_decode, again], [], now=1.0) > 0


def test_the_room_is_priced_with_the_chunks_of_requests_prefilling_again():
    """A request preempted after its first token prefills its 25 tokens again ahead of a fresh prompt:
    the room beside the decodes pays for both chunks."""
    policy = fitted_policy()
    decode = decoding(first_token_time=1.0, outputs=1)
    again = decoding(first_token_time=0.9, outputs=5)
    again.num_computed = 0
    priced = []
    max_prefill = policy.cost.max_prefill
    policy.cost.max_prefill = lambda *args: priced.append(args[5]) or max_prefill(*args)
    policy.prefill_tokens(512, [decode, again], [request(300, ttft_slo=0.05, arrival=1.0)], now=1.0)
    assert priced == [[25, 300]]


def borrowing_policy(borrowed_byte_seconds, host_budget=1 << 30):
    """fitted_policy() (1 ms a step, 50 us a token) with a host budget and a measured cost per borrowed byte."""
    policy = SLOPolicy(StepCost(borrowed_byte_seconds=borrowed_byte_seconds), host_budget=host_budget,
                       max_batched_tokens=512, max_num_seqs=32, min_prefill_tokens=16)
    for tokens in (1, 4, 16, 64, 128, 256, 4, 32):
        observe(policy, 0.001 + 5e-5 * tokens, StepWork(tokens, 0, 0), [], [], now=1.0)
    return policy


def test_borrowing_is_allowed_where_it_raises_decode_throughput():
    """Without targets: reading the device's 100 MB of KV from host memory would take 2 ms at 2e-11 s a
    byte, at 1e-12 0.1 ms. Against the 1 ms fixed part of a step: borrowing more requests beside those
    running lowers the time per token only in the second case."""
    running = [decoding(first_token_time=1.0, tpot_slo=None) for _ in range(4)]
    assert borrowing_policy(2e-11).borrow_allowance(1 << 30, running, 100_000_000) == 0
    assert borrowing_policy(1e-12).borrow_allowance(1 << 30, running, 100_000_000) == 1 << 30
    assert borrowing_policy(0.0).borrow_allowance(1 << 30, running, 100_000_000) == 1 << 30  # free
    halved = borrowing_policy(1e-12)
    halved.host_buffer = 1 << 29  # what breaches left of eLLM's logical buffer still bounds it
    assert halved.borrow_allowance(1 << 30, running, 100_000_000) == 1 << 29
    unfitted = SLOPolicy(StepCost(borrowed_byte_seconds=1e-12), host_budget=1 << 30, max_batched_tokens=512,
                         max_num_seqs=32, min_prefill_tokens=16)
    assert unfitted.borrow_allowance(1 << 30, running, 100_000_000) == 0  # nothing to judge by yet
    free = SLOPolicy(StepCost(), host_budget=1 << 30, max_batched_tokens=512, max_num_seqs=32, min_prefill_tokens=16)
    assert free.borrow_allowance(1 << 30, running, 100_000_000) == 1 << 30


def test_borrowing_beside_tpot_targets_keeps_the_decode_step_within_them():
    """4 decodes: 1.2 ms a step. Within 0.8 of a 2 ms target, 0.4 ms is left to read borrowed KV: 40 MB at
    1e-11 s a byte. With a 1.5 ms target nothing is left."""
    policy = borrowing_policy(1e-11)
    running = [decoding(first_token_time=1.0, tpot_slo=0.002) for _ in range(4)]
    assert policy.borrow_allowance(1 << 30, running, 100_000_000) == pytest.approx(40_000_000, rel=1e-6)
    tight = [decoding(first_token_time=1.0, tpot_slo=0.0015) for _ in range(4)]
    assert policy.borrow_allowance(1 << 30, tight, 100_000_000) == 0
