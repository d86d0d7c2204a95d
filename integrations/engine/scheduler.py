"""Continuous batching with chunked prefill. Each step takes all the KV blocks and activation memory it
needs before it runs; when they do not fit, the latest running request is preempted, by recompute
(its blocks are freed and it is prefilled again later) or, with preemption="borrow", first by letting
the KV cache borrow host memory within the policy's allowance."""
import time
from collections import deque

from .attention import is_decode
from .sequence import Status
from .step_cost import StepCost


class FCFSPolicy:
    """First come, first served; all the host budget may be borrowed."""

    def order(self, waiting, running, now):
        return list(waiting)

    def prefill_tokens(self, max_batched_tokens, running, now):
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


class SLOPolicy:
    """Uses the requests' TTFT/TPOT targets, after eLLM, judged over the last `window` steps.

    - Decode batch cap (how many requests may run at once): when TPOT targets are breached in
      `breaches` of the last `window` steps it drops to half the decode batch that breached them
      (multiplicative decrease); every step that meets the tightest TPOT target with `slack` to spare
      raises it by one (additive increase). On a compute-bound device a step's time grows with its batch.
    - Logical host buffer (how much KV may be borrowed) and prefill token budget per step: halved on
      TPOT breaches (fewer prefills slow decodes less), doubled on TTFT breaches (more prefills admitted,
      borrowing rather than queueing).
    - Prefill chunk size, our improvement on the paper: while requests that can still meet their TPOT
      targets are decoding, a step's prefill tokens are the most that a cost model fitted online to the
      recent steps (step_cost.py) predicts will keep the step within `slack` of the tightest target, and
      at least `min_prefill_tokens`, so a burst of prompts is chunked in beside the decodes instead of
      stalling them. Before the model has seen enough steps, the budget above stands in.
    Waiting requests go earliest TTFT deadline first; those already past it go last, as they can no
    longer count towards goodput."""

    def __init__(self, host_budget, max_batched_tokens, max_num_seqs, min_prefill_tokens, window=5, breaches=3,
                 slack=0.8):
        self.host_buffer = self.max_host_buffer = host_budget
        self.prefill_budget = self.max_prefill = max_batched_tokens
        self.min_prefill = min_prefill_tokens
        self.batch_cap = self.max_batch = max_num_seqs
        self.window, self.breaches, self.slack = window, breaches, slack
        self.tpot_history, self.ttft_history = deque(maxlen=window), deque(maxlen=window)
        self.cost = StepCost()

    def order(self, waiting, running, now):
        """Earliest TTFT deadline first. Requests past theirs come last, and only once no request that can
        still meet its targets is running: their prefill would slow its decode for no goodput."""
        def due(seq):
            return seq.arrival + seq.ttft_slo if seq.ttft_slo is not None else float("inf")

        on_time = sorted((s for s in waiting if due(s) >= now), key=lambda s: (due(s), s.arrival))
        if any(_on_time(s) and s.tpot_slo is not None for s in running):
            return on_time
        return on_time + sorted((s for s in waiting if due(s) < now), key=lambda s: s.arrival)

    def prefill_tokens(self, max_batched_tokens, running, now):
        """Prefill tokens the coming step may run beside the decodes of `running`."""
        decoders = [s for s in running if s.first_token_time is not None and s.num_uncomputed == 1]
        at_stake = [s for s in decoders if s.tpot_slo is not None and _on_time(s)]
        if not at_stake or not self.cost.ready:
            return self.prefill_budget
        decode_pairs = sum(len(s) for s in decoders)  # one new token after len(s) - 1 computed
        step = self.slack * min(s.tpot_slo for s in at_stake)
        room = self.cost.max_prefill(len(decoders), decode_pairs, step, max_batched_tokens)
        return max(self.min_prefill, room)

    def max_running(self, max_num_seqs):
        return min(self.batch_cap, max_num_seqs)

    def host_allowance(self, host_budget):
        return min(self.host_buffer, host_budget)

    def observe(self, step_seconds, work, decoding, waiting, now):
        """step_seconds: how long the step took; work: its step_work(); decoding: the requests it decoded;
        waiting: those queued."""
        self.cost.observe(work, step_seconds)
        targets = [s.tpot_slo for s in decoding if s.tpot_slo is not None]
        # A batch above the cap is one admitted before the cap fell: the cap already acts on it.
        self.tpot_history.append(bool(targets) and step_seconds > min(targets) and len(decoding) <= self.batch_cap)
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


class Scheduler:
    def __init__(self, block_manager, memory, policy, max_num_seqs, max_batched_tokens, chunked_prefill,
                 preemption):
        if preemption not in ("recompute", "borrow"):
            raise ValueError(f"preemption must be 'recompute' or 'borrow', got {preemption!r}")
        self.blocks, self.memory, self.policy = block_manager, memory, policy
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.chunked_prefill, self.preemption = chunked_prefill, preemption
        self.waiting, self.running = deque(), []
        self.num_preemptions = 0
        self._prefill_budget = max_batched_tokens  # this step's, from the policy

    def add(self, seq):
        self.waiting.append(seq)

    def has_work(self):
        return bool(self.waiting or self.running)

    def _allowance(self):
        if self.preemption != "borrow":
            return 0
        return self.policy.host_allowance(self.memory.pool.host_budget_bytes)

    def _take(self, seq, n, tokens, whole=False):
        """Give seq blocks for n more tokens, or for a smaller prefill chunk (halving: fewer tokens need
        fewer activation bytes) if n does not fit in the step (now `tokens` tokens). whole: only if the
        blocks for all its uncomputed tokens fit too (as vLLM admits a prompt: a prefill started without
        room to finish is preempted halfway and its work lost). Returns the tokens taken, 0 if none fit."""
        while not self._try_take(seq, n, tokens, whole):
            if not self.chunked_prefill or n <= self.blocks.block_size or is_decode(seq, n):
                return 0
            n //= 2
        return n

    def _try_take(self, seq, n, tokens, whole):
        extra = self.blocks.blocks_for(len(seq) if whole else seq.num_computed + n) - len(seq.block_table)
        high_water = self.blocks.high_water_after(extra)
        if high_water is None or not self.memory.fits(high_water, tokens + n, self._allowance()):
            return False
        self.blocks.grow(seq, seq.num_computed + n)
        return True

    def _preempt(self, seq):
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _chunk(self, seq, tokens, prefill_tokens):
        """Tokens of seq to run in a step that has `tokens` so far, `prefill_tokens` of them prefill: all
        it has left, or a chunk if chunked prefill is on (0: none)."""
        room = self.max_batched_tokens - tokens
        if not (seq.num_uncomputed == 1 and seq.num_computed > 0):  # a prefill: the policy limits those
            room = min(room, self._prefill_budget - prefill_tokens)
        n = max(0, min(seq.num_uncomputed, room))
        return n if n == seq.num_uncomputed or self.chunked_prefill else 0

    def schedule(self):
        """The step's (sequence, new tokens) pairs, prefills first; [] when nothing can run."""
        chunks, tokens, prefill_tokens = [], 0, 0
        preemptions = self.num_preemptions
        self._prefill_budget = self.policy.prefill_tokens(self.max_batched_tokens, self.running, time.perf_counter())
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted below to make room for an earlier request
            n = self._chunk(seq, tokens, prefill_tokens)
            if n == 0:
                continue
            while not (taken := self._take(seq, n, tokens)):
                self._preempt(self.running[-1])
                if seq.status is not Status.RUNNING:
                    break
            else:
                n = taken
                chunks.append((seq, n))
                tokens += n
                prefill_tokens += 0 if is_decode(seq, n) else n
        # No admissions in a step that preempted (as vLLM), unless nothing else runs: the request just
        # preempted would be readmitted into the room it left, and preempted again next step.
        admit = self.num_preemptions == preemptions or not chunks
        admit = self.policy.order(self.waiting, self.running, time.perf_counter()) if admit else []
        max_running = self.policy.max_running(self.max_num_seqs)
        for seq in admit:
            if len(self.running) >= max_running:
                break
            cached = self.blocks.take_cached(seq)
            n = self._chunk(seq, tokens, prefill_tokens)
            n = n and self._take(seq, n, tokens, whole=True)
            if n == 0:
                self.blocks.free(seq)  # the cached blocks too: a waiting request holds none
                seq.num_computed = 0
                break
            seq.num_cached_tokens += cached
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append((seq, n))
            tokens += n
            prefill_tokens += n
        chunks.sort(key=lambda c: is_decode(*c))
        return chunks

    def finish(self, seq):
        """Forget a finished or aborted request and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
