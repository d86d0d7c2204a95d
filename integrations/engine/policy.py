"""Scheduling policies: what the scheduler asks before each step (order of admission, prefill tokens,
how many may run, how much KV may be swapped or borrowed) and what it tells after (observe)."""
import heapq
from collections import deque

from .step_cost import chunk_pairs


class FCFSPolicy:
    """First come, first served; all the host budget may be borrowed."""

    def order(self, waiting, running, now):
        return list(waiting)

    def prefill_tokens(self, max_batched_tokens, running, queue, now):
        return max_batched_tokens

    def max_running(self, max_num_seqs, running, candidates):
        return max_num_seqs

    def host_allowance(self, host_budget):
        return host_budget

    def borrow_allowance(self, host_budget, running, kv_device_bytes):
        return host_budget

    def observe(self, step_seconds, work, decoding, waiting, now):
        pass


def _on_time(seq):
    """Whether seq got (or may still get) its first token within its TTFT target."""
    if seq.ttft_slo is None or seq.first_token_time is None:
        return True
    return seq.first_token_time - seq.arrival <= seq.ttft_slo


def _time_left(seq, now):
    """Seconds seq's TPOT target leaves for the tokens still to come: the target's time for the
    max_tokens - 1 tokens after the first, less what it has used."""
    return seq.tpot_slo * (seq.params.max_tokens - 1) - (now - seq.first_token_time)


def _tokens_left(seq):
    return max(1, seq.params.max_tokens - seq.num_output_tokens)


def _step_allowance(seq, now):
    """Seconds each step decoding seq may take for its mean time per output token to meet its target:
    the time left, spread over the tokens to come. A request ahead of its target has time banked."""
    return _time_left(seq, now) / _tokens_left(seq)


def _due(seq):
    return seq.arrival + seq.ttft_slo if seq.ttft_slo is not None else float("inf")


class SLOPolicy:
    """Uses the requests' TTFT/TPOT targets, after eLLM, judged over the last `window` steps.

    - How many requests may run at once: as many as a cost model fitted online to the recent steps
      (step_cost.py) predicts decode within `slack` of the tightest TPOT target, our addition: on a
      compute-bound device a step's time grows with its batch and its contexts. Until the model has
      seen enough steps, a batch cap stands in: when decode-only steps breach the TPOT targets in
      `breaches` of the last `window` steps it drops to half the decode batch that breached them
      (multiplicative decrease); every step that meets the tightest target with `slack` to spare
      raises it by one (additive increase). Halving stalls admissions for many steps after a burst,
      which costs TTFT; the model admits what fits at once.
    - Logical host buffer (how much KV may be borrowed): halved on those TPOT breaches, doubled on TTFT
      breaches (more prefills admitted, borrowing rather than queueing).
    - Prefill tokens per step, our addition: while requests that can still meet their TPOT targets are
      decoding, the most that the cost model predicts keeps the step within `slack` of what each one's
      target still allows a step (its target's time for all its tokens, less what it used, spread over
      those to come: a request ahead of its target has time banked), at least `min_prefill_tokens`: a
      burst of prompts is chunked in beside the decodes instead of stalling them. But none while the
      decodes can all finish first and the prompts still make their TTFT targets, within `slack`,
      prefilled after them in whole steps: a prefill slows every decode beside it, and a burst's first
      prompt is decoding before the rest have arrived. And unless that pace would make more than `trade`
      times as many prompts miss their TTFT targets (that could then decode in time beside those
      running) as there are decodes that whole steps of prefill would push past their targets (those
      whose banked time cannot absorb the prompts' prefill): then the step takes the whole prefill
      budget. A first token saved is worth less than a decode kept: it counts only if the request then
      meets its TPOT too, beside whatever arrives next (trading one for one collapsed under full load).
      Until the model is ready, a budget halved on TPOT breaches and doubled on TTFT breaches stands in.
    - Admission order: preempted requests that had their first token go first; then waiting requests
      earliest TTFT deadline first, less those that cannot all make it: where whole-step prefills of
      the queue in that order are predicted late, the longest prompt goes (Moore and Hodgson's rule:
      the most first tokens in time); those and the requests past their deadlines go last, as they can
      no longer count towards goodput.
    The cost model prices a step by its tokens, attention pairs, prefill chunks and decodes."""

    def __init__(self, cost, host_budget, max_batched_tokens, max_num_seqs, min_prefill_tokens, window=5, breaches=3,
                 slack=0.8, trade=4):
        """cost: the engine's StepCost, fed every step by the engine. trade: how many first tokens a whole
        step of prefill must save per decode it slows past its target (see the class docstring)."""
        self.host_buffer = self.max_host_buffer = host_budget
        self.prefill_budget = self.max_prefill = max_batched_tokens
        self.min_prefill = min_prefill_tokens
        self.batch_cap = self.max_batch = max_num_seqs
        self.window, self.breaches, self.slack, self.trade = window, breaches, slack, trade
        self.tpot_history, self.ttft_history = deque(maxlen=window), deque(maxlen=window)
        self.cost = cost

    def order(self, waiting, running, now):
        """Preempted requests that already had their first token go first (their TTFT is settled; their
        TPOT runs on, and a swapped one holds host memory), oldest first. Then earliest TTFT deadline
        first, less those that cannot all make their deadlines (see _most_in_time). Requests past theirs,
        or dropped, come last, oldest first, and only once no request that can still meet its targets is
        running: their prefill would slow its decode for no goodput."""
        started = sorted((s for s in waiting if s.first_token_time is not None), key=lambda s: s.arrival)
        fresh = [s for s in waiting if s.first_token_time is None]
        on_time = sorted((s for s in fresh if _due(s) >= now), key=lambda s: (_due(s), s.arrival))
        on_time, dropped = self._most_in_time(on_time, running, now)
        if any(_on_time(s) and s.tpot_slo is not None for s in running):
            return started + on_time
        late = sorted(dropped + [s for s in fresh if _due(s) < now], key=lambda s: s.arrival)
        return started + on_time + late

    def _most_in_time(self, prompts, running, now):
        """(kept, dropped): the most of prompts (in deadline order) predicted to get their first tokens by
        their TTFT deadlines, prefilled one after another in whole steps after the running prompts, and
        the rest. Moore and Hodgson's rule, optimal for one machine: wherever the kept run late, drop the
        longest kept. A burst that prefill cannot clear in time loses its fewest requests, not its last.
        Only the first 2 * max_num_seqs are judged (no step admits more); the others stay in order."""
        if not self.cost.ready or all(seq.ttft_slo is None for seq in prompts):
            return prompts, []
        judged, rest = prompts[:2 * self.max_batch], prompts[2 * self.max_batch:]
        seconds = self.cost.prefill_seconds(judged, self.max_prefill)
        finish = now + sum(self.cost.prefill_seconds([s for s in running if s.first_token_time is None],
                                                     self.max_prefill))
        kept = []  # heap of (-seconds, index)
        for i, seq in enumerate(judged):
            heapq.heappush(kept, (-seconds[i], i))
            finish += seconds[i]
            if finish > _due(seq):
                finish += heapq.heappop(kept)[0]
        keep = {i for _, i in kept}
        return ([seq for i, seq in enumerate(judged) if i in keep] + rest,
                [seq for i, seq in enumerate(judged) if i not in keep])

    def prefill_tokens(self, max_batched_tokens, running, queue, now):
        """Prefill tokens the coming step may run beside the decodes of `running`, with `queue` the waiting
        requests as order() ranks them (the scheduler's, asked once a step): see the class docstring."""
        if not self.cost.ready:
            return self.prefill_budget
        decoders = [s for s in running if s.first_token_time is not None and s.num_uncomputed == 1]
        if not queue and len(decoders) == len(running):  # nothing to prefill: most steps between bursts
            return max_batched_tokens
        decode_pairs = sum(len(s) for s in decoders)  # one new token after len(s) - 1 computed
        decode_seconds = self.cost.decode_seconds(len(decoders), decode_pairs)
        # The rest cannot meet their targets even with no prefill.
        protected = [s for s in decoders if s.tpot_slo is not None and _on_time(s)
                     and _step_allowance(s, now) >= decode_seconds]
        if not protected:
            return max_batched_tokens
        # A first token in time counts only for a prompt that can then decode within its target too: no
        # more than the cost model lets run beside those running.
        fresh = [s for s in queue if s.first_token_time is None and _due(s) >= now]
        fresh = fresh[:max(0, self.max_running(len(running) + len(fresh), running, fresh) - len(running))]
        whole = list(self._whole_steps([s for s in running if s.first_token_time is None] + fresh,
                                       max_batched_tokens))
        # Requests preempted after their first token: their TPOT runs on while they wait or prefill again.
        resuming = [s for s in queue if s.first_token_time is not None]
        resuming += [s for s in running if s.first_token_time is not None and s.num_uncomputed > 1]
        if not resuming and self._decodes_finish_first(decoders, whole, now):
            return 0
        seconds = self.slack * min(_step_allowance(s, now) for s in protected)
        # Running prompts go first, each chunk after its computed tokens: price it at the longest context.
        context = max((s.num_computed for s in running if s.num_uncomputed > 1 or s.first_token_time is None),
                      default=0)
        # A chunk's price for each prompt the room reaches into, the resuming ones' ahead of the others.
        chunks = [s.num_uncomputed for s in resuming if s.num_uncomputed > 1] + [s.num_uncomputed for s, _ in whole]
        room = max(self.min_prefill, self.cost.max_prefill(len(decoders), decode_pairs, context, seconds,
                                                           max_batched_tokens, chunks))
        # Whole steps of prefill push past its target only a decode whose banked time cannot absorb them.
        prefill = whole[-1][1] if whole else 0.0
        harmed = sum(_time_left(s, now) - _tokens_left(s) * decode_seconds < prefill for s in protected)
        if self._ttft_saved(whole, room, seconds, now) > self.trade * harmed:
            return max_batched_tokens
        return room

    def _decodes_finish_first(self, decoders, whole, now):
        """Whether the decodes running may all finish, in decode-only steps, before the prompts prefill in
        whole steps (`whole`: _whole_steps()) and still get their first tokens within `slack` of the time
        left to their TTFT deadlines. Every step a prefill rides along slows every decode in it, and a
        burst's prompts arrive while the first of them already decodes; prompts with time to spare can
        wait instead, and prefill beside none."""
        waited = self._drain_seconds(decoders)
        return all(waited + seconds <= self.slack * (_due(seq) - now) for seq, seconds in whole)

    def _drain_seconds(self, decoders):
        """Predicted seconds of decode-only steps until decoders have all their tokens (max_tokens each: an
        end-of-sequence token may finish one sooner)."""
        left = sorted((s.params.max_tokens - s.num_output_tokens, len(s)) for s in decoders)
        seconds, done, pairs = 0.0, 0, sum(context for _, context in left)
        for i, (tokens, _) in enumerate(left):
            alive, steps = len(left) - i, tokens - done
            if steps > 0:  # steps decodes alike, their contexts one longer each step: the mean is exact
                seconds += steps * self.cost.decode_seconds(alive, pairs + alive * (steps - 1) / 2)
                pairs += alive * steps
                done = tokens
            pairs -= left[i][1] + done  # it finishes: its context leaves the steps
        return seconds

    def _whole_steps(self, prompts, max_batched_tokens):
        """(prompt, predicted seconds until its first token) for prompts in the order they would run, each
        step taking the whole prefill budget."""
        tokens, pairs = 0, 0
        for count, seq in enumerate(prompts, 1):
            n = seq.num_uncomputed
            tokens, pairs = tokens + n, pairs + chunk_pairs(n, seq.num_computed)
            steps = -(-tokens // max_batched_tokens)
            yield seq, steps * self.cost.predict(0, 0) + self.cost.extra_seconds(tokens, pairs, prefills=count)

    def _ttft_saved(self, whole, room, step_seconds, now):
        """How many prompts are predicted to miss their TTFT targets with `room` prefill tokens a step of
        step_seconds, and to meet them in whole steps (`whole`: _whole_steps())."""
        saved, tokens = 0, 0
        for seq, full in whole:
            tokens += seq.num_uncomputed
            throttled = -(-tokens // room) * step_seconds
            saved += now + throttled > _due(seq) >= now + full
        return saved

    def max_running(self, max_num_seqs, running, candidates):
        """How many requests may run, given those running and the candidates for admission in order: the
        most whose decodes the cost model predicts within `slack` of the tightest TPOT target, each one
        adding a decode token over its context; the batch cap while the model is not ready, no request
        has a target, or the target is out of reach even for one request alone."""
        targets = [s.tpot_slo for s in running if s.tpot_slo is not None and _on_time(s)]
        targets += [s.tpot_slo for s in candidates if s.tpot_slo is not None]
        if not targets or not self.cost.ready:
            return min(self.batch_cap, max_num_seqs)
        seconds = self.slack * min(targets)
        queue = [*running, *candidates][:max_num_seqs]
        if queue and self.cost.decode_seconds(1, len(queue[0])) > seconds:
            return min(self.batch_cap, max_num_seqs)  # out of reach even alone: holding back gains nothing
        return self.cost.max_decodes([len(seq) for seq in queue], seconds)

    def host_allowance(self, host_budget):
        """Host bytes of KV that may be swapped or borrowed to run requests side by side: the logical host
        buffer."""
        return min(self.host_buffer, host_budget)

    def borrow_allowance(self, host_budget, running, kv_device_bytes):
        """Host bytes of KV the coming step may read in place (borrowed) to run requests side by side: the
        logical host buffer, within what the cost model says reading them is worth (our addition; eLLM's
        buffer sees only breaches). With TPOT targets running, the bytes more whose reading keeps the
        decode step of those decoding (the KV borrowed already priced in) within `slack` of the tightest
        of their targets. Without, borrowing pays only if it raises decode throughput: with D bytes of
        the running requests' KV on the device (kv_device_bytes, at most) and k more requests of their
        mean size borrowed, a step's time per token, (fixed + c * borrowed bytes) / (n + k) plus the costs per
        request, falls with k exactly when reading D from host memory would cost less than the step's
        fixed part (c * D < fixed), whatever k: then all of the buffer, else none. None until the model
        is ready, unless reading host memory costs nothing more (the CPU)."""
        allowance = self.host_allowance(host_budget)
        if not allowance or self.cost.borrowed_seconds(1) <= 0:  # host memory reads as fast: borrowing is free
            return allowance
        if not self.cost.ready:
            return 0
        decoders = [s for s in running if s.first_token_time is not None]
        targets = [s.tpot_slo for s in decoders if s.tpot_slo is not None and _on_time(s)]
        if targets:
            spare = self.slack * min(targets) - self.cost.decode_seconds(len(decoders), sum(map(len, decoders)))
            return min(allowance, max(0, int(spare / self.cost.borrowed_seconds(1))))
        return allowance if self.cost.borrowed_seconds(kv_device_bytes) < self.cost.fixed_seconds() else 0

    def observe(self, step_seconds, work, decoding, waiting, now):
        """step_seconds: how long the step took; work: its step_work(); decoding: the requests it decoded;
        waiting: those queued. A slow step with prefill in it counts as a TPOT breach only if its decodes
        alone are predicted over the target: the prefill was sized knowing its cost, the batch was not."""
        targets = [s.tpot_slo for s in decoding if s.tpot_slo is not None]
        decodes_alone = step_seconds
        if targets and work.tokens > work.decodes and self.cost.ready:
            decodes_alone = self.cost.decode_seconds(len(decoding), sum(len(s) for s in decoding))
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
