"""The SLO policy's step cost model: fitted online, coefficients kept non-negative, and the prefill
budget it gives beside decodes with TPOT targets."""
from types import SimpleNamespace

import pytest

from torch_ellm.integrations.engine.sampling_params import SamplingParams
from torch_ellm.integrations.engine.scheduler import SLOPolicy
from torch_ellm.integrations.engine.sequence import Sequence
from torch_ellm.integrations.engine.step_cost import StepCost, step_work


def test_step_work_counts_tokens_and_attention_pairs():
    prefill = SimpleNamespace(num_computed=0)
    chunk = SimpleNamespace(num_computed=32)
    decode = SimpleNamespace(num_computed=99)
    # 10 fresh tokens: 55 causal pairs; 8 after 32: 8*32 + 36; 1 after 99: 100
    assert step_work([(prefill, 10), (chunk, 8), (decode, 1)]) == (19, 55 + 292 + 100)


def test_fit_recovers_a_linear_cost_and_predicts():
    cost = StepCost(min_steps=4)
    truth = lambda tokens, pairs: 0.002 + 1e-4 * tokens + 2e-7 * pairs
    for tokens, pairs in [(1, 50), (8, 900), (64, 3000), (200, 20000), (16, 100_000), (300, 45_000)]:
        assert not cost.ready or len(cost.history) >= 4
        cost.observe((tokens, pairs), truth(tokens, pairs))
    assert cost.ready
    assert cost.predict(100, 5000) == pytest.approx(truth(100, 5000), rel=1e-6)
    limit = cost.max_prefill(8, 8000, 0.02, 1024)  # the most fresh tokens beside 8 decodes within 20 ms
    assert truth(8 + limit, 8000 + limit * (limit + 1) // 2) <= 0.02 < truth(9 + limit, 8000 + (limit + 1) * (limit + 2) // 2)


def test_a_feature_that_fits_negative_is_dropped():
    cost = StepCost(min_steps=1)
    for tokens, pairs, seconds in [(10, 1000, 0.02), (20, 100, 0.03), (40, 50, 0.05), (5, 4000, 0.01)]:
        cost.observe((tokens, pairs), seconds)  # more pairs, less time: noise the model must not believe
    coef = cost._fit()
    assert (coef >= 0).all() and coef[2] == 0
    assert cost.max_prefill(0, 0, 10.0, 512) == 512  # everything fits a generous step


def decoding_request(tpot_slo, first_token_time, outputs=3):
    seq = Sequence(0, [1] * 20, SamplingParams(temperature=0, max_tokens=20), ttft_slo=1.0, tpot_slo=tpot_slo,
                   arrival=0.0)
    for t in range(outputs):
        seq.append(7, first_token_time)
    seq.num_computed = len(seq) - 1
    return seq


def test_slo_policy_sizes_prefill_from_the_model_beside_on_time_decodes():
    policy = SLOPolicy(host_budget=0, max_batched_tokens=512, max_num_seqs=32, min_prefill_tokens=16)
    running = [decoding_request(0.01, first_token_time=0.5) for _ in range(4)]
    assert policy.prefill_tokens(512, running, now=1.0) == 512  # no model yet: the AIMD budget
    for tokens in (1, 4, 16, 64, 128, 256, 4, 32):
        policy.observe(0.001 + 5e-5 * tokens, (tokens, 0), [], [], now=1.0)  # attention too cheap to see
    room = policy.prefill_tokens(512, running, now=1.0)
    # 0.8 * 10 ms: 1 ms fixed + 4 decodes + the prefill at 50 us a token and pair-free
    assert room == pytest.approx((0.008 - 0.001) / 5e-5 - 4, abs=1)
    late = decoding_request(0.01, first_token_time=5.0)  # first token after its 1 s TTFT target: lost
    assert policy.prefill_tokens(512, [late], now=6.0) == 512
    tight = [decoding_request(0.0001, first_token_time=0.5)]
    assert policy.prefill_tokens(512, tight, now=1.0) == 16  # always some progress
