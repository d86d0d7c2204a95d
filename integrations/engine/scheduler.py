"""Continuous batching with chunked prefill. Each step takes all the KV blocks and activation memory it
needs before it runs; when they do not fit, the latest running request is preempted, by recompute
(its blocks are freed and it is prefilled again later) or, with preemption="borrow", first by letting
the KV cache borrow host memory within the policy's allowance."""
import time
from collections import deque

from .attention import is_decode
from .sequence import Status


class FCFSPolicy:
    """First come, first served; all the host budget may be borrowed."""

    def order(self, waiting, now):
        return list(waiting)

    def prefill_tokens(self, max_batched_tokens):
        return max_batched_tokens

    def host_allowance(self, host_budget):
        return host_budget

    def observe(self, step_seconds, decoding, waiting, now):
        pass


class SLOPolicy:
    """Uses the requests' TTFT/TPOT targets, after eLLM: a logical host buffer (how much KV may be
    borrowed) and a prefill token budget per step, halved when TPOT targets are breached in `breaches`
    of the last `window` steps (fewer prefills slow decodes less) and doubled when TTFT targets are
    (more prefills admitted, borrowing rather than queueing). Waiting requests go earliest TTFT deadline
    first; those already past it go last, as they can no longer count towards goodput."""

    def __init__(self, host_budget, max_batched_tokens, min_prefill_tokens, window=5, breaches=3):
        self.host_buffer = host_budget
        self.max_host_buffer = host_budget
        self.prefill_budget = max_batched_tokens
        self.max_prefill = max_batched_tokens
        self.min_prefill = min_prefill_tokens
        self.window, self.breaches = window, breaches
        self.tpot_history, self.ttft_history = deque(maxlen=window), deque(maxlen=window)

    def order(self, waiting, now):
        def deadline(seq):
            due = seq.arrival + seq.ttft_slo if seq.ttft_slo is not None else float("inf")
            return (due < now, due, seq.arrival)
        return sorted(waiting, key=deadline)

    def prefill_tokens(self, max_batched_tokens):
        return self.prefill_budget

    def host_allowance(self, host_budget):
        return min(self.host_buffer, host_budget)

    def observe(self, step_seconds, decoding, waiting, now):
        self.tpot_history.append(any(s.tpot_slo is not None and step_seconds > s.tpot_slo for s in decoding))
        self.ttft_history.append(any(s.ttft_slo is not None and now - s.arrival > s.ttft_slo for s in waiting))
        if sum(self.tpot_history) >= self.breaches:
            self.host_buffer //= 2
            self.prefill_budget = max(self.min_prefill, self.prefill_budget // 2)
            self.tpot_history.clear()
        elif sum(self.ttft_history) >= self.breaches:
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

    def add(self, seq):
        self.waiting.append(seq)

    def has_work(self):
        return bool(self.waiting or self.running)

    def _allowance(self):
        if self.preemption != "borrow":
            return 0
        return self.policy.host_allowance(self.memory.pool.host_budget_bytes)

    def _take(self, seq, n, tokens):
        """Give seq blocks for n more tokens, or for a smaller prefill chunk (halving: fewer tokens need
        fewer activation bytes) if n does not fit in the step (now `tokens` tokens). Returns the tokens
        taken, 0 if none fit."""
        while not self._try_take(seq, n, tokens):
            if not self.chunked_prefill or n <= self.blocks.block_size or is_decode(seq, n):
                return 0
            n //= 2
        return n

    def _try_take(self, seq, n, tokens):
        extra = self.blocks.blocks_for(seq.num_computed + n) - len(seq.block_table)
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
            room = min(room, self.policy.prefill_tokens(self.max_batched_tokens) - prefill_tokens)
        n = max(0, min(seq.num_uncomputed, room))
        return n if n == seq.num_uncomputed or self.chunked_prefill else 0

    def schedule(self):
        """The step's (sequence, new tokens) pairs, prefills first; [] when nothing can run."""
        chunks, tokens, prefill_tokens = [], 0, 0
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
        for seq in self.policy.order(self.waiting, time.perf_counter()):
            if len(self.running) >= self.max_num_seqs:
                break
            n = self._chunk(seq, tokens, prefill_tokens)
            n = n and self._take(seq, n, tokens)
            if n == 0:
                break
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
