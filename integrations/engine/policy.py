"""Scheduling policies: what the scheduler asks before each step (order of admission, prefill tokens,
how many may run, how much KV may be borrowed) and what it tells after (observe)."""
from collections import deque


class FCFSPolicy:
    """First come, first served; all the host budget may be borrowed."""

    def order(self, waiting, running, now):
        return list(waiting)

    def prefill_tokens(self, max_batched_tokens, running, waiting, now):
        return max_batched_tokens

    def max_running(self, max_num_seqs):
        return max_num_seqs

    def host_allowance(self, host_budget):
        return host_budget

    def observe(self, step_seconds, work, decoding, waiting, now):
        pass


def _on_time(seq):
    """Whether seq got (or may still get) its first token within its TTFT target."""
    if seq.ttft_slo is None or seq.first_token_time is None:
        return True
    return seq.first_token_time - seq.arrival <= seq.ttft_slo


def _due(seq):
    return seq.arrival + seq.ttft_slo if seq.ttft_slo is not None else float("inf")


class SLOPolicy:
    """Uses the requests' TTFT/TPOT targets, after eLLM, judged over the last `window` steps.

    - Decode batch cap (how many requests may run at once): when decode-only steps breach the TPOT
      targets in `breaches` of the last `window` steps it drops to half the decode batch that breached
      them (multiplicative decrease); every step that meets the tightest TPOT target with `slack` to
      spare raises it by one (additive increase). On a compute-bound device a step's time grows with
      its batch.
    - Logical host buffer (how much KV may be borrowed): halved on those TPOT breaches, doubled on TTFT
      breaches (more prefills admitted, borrowing rather than queueing).
    - Prefill tokens per step, our addition: while requests that can still meet their TPOT targets are
      decoding, the most that a cost model fitted online to the recent steps (step_cost.py) predicts
      keeps the step within `slack` of the tightest target, at least `min_prefill_tokens`: a burst of
      prompts is chunked in beside the decodes instead of stalling them. Until the model has seen
      enough steps, a budget halved on TPOT breaches and doubled on TTFT breaches stands in.
    Preempted requests that had their first token go first; then waiting requests earliest TTFT deadline
    first; those already past it go last, as they can no longer count towards goodput."""

    def __init__(self, cost, host_budget, max_batched_tokens, max_num_seqs, min_prefill_tokens, window=5, breaches=3,
                 slack=0.8):
        """cost: the engine's StepCost, fed every step by the engine."""
        self.host_buffer = self.max_host_buffer = host_budget
        self.prefill_budget = self.max_prefill = max_batched_tokens
        self.min_prefill = min_prefill_tokens
        self.batch_cap = self.max_batch = max_num_seqs
        self.window, self.breaches, self.slack = window, breaches, slack
        self.tpot_history, self.ttft_history = deque(maxlen=window), deque(maxlen=window)
        self.cost = cost

    def order(self, waiting, running, now):
        """Preempted requests that already had their first token go first (their TTFT is settled; their
        TPOT runs on, and a swapped one holds host memory), oldest first. Then earliest TTFT deadline first.
        Requests past theirs come last, and only once no request that can still meet its targets is
        running: their prefill would slow its decode for no goodput."""
        started = sorted((s for s in waiting if s.first_token_time is not None), key=lambda s: s.arrival)
        fresh = [s for s in waiting if s.first_token_time is None]
        on_time = sorted((s for s in fresh if _due(s) >= now), key=lambda s: (_due(s), s.arrival))
        if any(_on_time(s) and s.tpot_slo is not None for s in running):
            return started + on_time
        return started + on_time + sorted((s for s in fresh if _due(s) < now), key=lambda s: s.arrival)

    def prefill_tokens(self, max_batched_tokens, running, waiting, now):
        """Prefill tokens the coming step may run beside the decodes of `running`: see the class docstring."""
        decoders = [s for s in running if s.first_token_time is not None and s.num_uncomputed == 1]
        targets = [s.tpot_slo for s in decoders if s.tpot_slo is not None and _on_time(s)]
        if not targets or not self.cost.ready:
            return self.prefill_budget
        decode_pairs = sum(len(s) for s in decoders)  # one new token after len(s) - 1 computed
        # Running prompts go first, each chunk after its computed tokens: price it at the longest context.
        context = max((s.num_computed for s in running if s.num_uncomputed > 1 or s.first_token_time is None),
                      default=0)
        room = self.cost.max_prefill(len(decoders), decode_pairs, context, self.slack * min(targets),
                                     max_batched_tokens)
        return max(self.min_prefill, room)

    def max_running(self, max_num_seqs):
        return min(self.batch_cap, max_num_seqs)

    def host_allowance(self, host_budget):
        return min(self.host_buffer, host_budget)

    def observe(self, step_seconds, work, decoding, waiting, now):
        """step_seconds: how long the step took; work: its step_work(); decoding: the requests it decoded;
        waiting: those queued. A slow step with prefill in it counts as a TPOT breach only if its decodes
        alone are predicted over the target: the prefill was sized knowing its cost, the batch was not."""
        targets = [s.tpot_slo for s in decoding if s.tpot_slo is not None]
        decodes_alone = step_seconds
        if targets and work.tokens > work.decodes and self.cost.ready:
            decodes_alone = self.cost.predict(len(decoding), sum(len(s) for s in decoding))
        # A batch above the cap is one admitted before the cap fell: the cap already acts on it.
        self.tpot_history.append(bool(targets) and min(step_seconds, decodes_alone) > min(targets)
                                 and len(decoding) <= self.batch_cap)
        self.ttft_history.append(any(s.ttft_slo is not None and now - s.arrival > s.ttft_slo for s in waiting))
        if sum(self.tpot_history) >= self.breaches:
            self.batch_cap = max(1, min(self.batch_cap, len(decoding)) // 2)
            self.host_buffer //= 2
            self.prefill_budget = max(self.min_prefill, self.prefill_budget // 2)
            self.tpot_history.clear()
            return
        if targets and step_seconds <= self.slack * min(targets):
            self.batch_cap = min(self.max_batch, self.batch_cap + 1)
        if sum(self.ttft_history) >= self.breaches:
            self.host_buffer = min(self.max_host_buffer, max(1 << 20, self.host_buffer * 2))
            self.prefill_budget = min(self.max_prefill, self.prefill_budget * 2)
            self.ttft_history.clear()
