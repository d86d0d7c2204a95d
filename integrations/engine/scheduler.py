"""Continuous batching with chunked prefill. Each step takes all the KV blocks and activation memory it
needs before it runs; when they do not fit, the latest running request is preempted, by recompute
(its blocks are freed and it is prefilled again later), by swapping (preemption="swap": its K/V are
copied to host memory within the policy's allowance, its blocks freed, and the K/V copied back when it
runs again; recompute where there is no room), by whichever of the two is predicted cheaper for the
request (preemption="auto"), or, with preemption="borrow", first by letting the KV cache borrow host
memory within the policy's allowance. With prefill_first, as vLLM's scheduler without chunked prefill,
a step that can prefill runs no decode: decodes wait until no prompt can run, then go in one batch."""
import time
from collections import deque

from .attention import is_decode
from .sequence import Status


class Scheduler:
    def __init__(self, block_manager, memory, policy, max_num_seqs, max_batched_tokens, chunked_prefill,
                 preemption, swap, prefill_first=False):
        self.blocks, self.memory, self.policy, self.swap = block_manager, memory, policy, swap
        self.max_num_seqs, self.max_batched_tokens = max_num_seqs, max_batched_tokens
        self.chunked_prefill, self.preemption, self.prefill_first = chunked_prefill, preemption, prefill_first
        self.waiting, self.running = deque(), []
        self.num_preemptions = 0
        self.swapped_in = []  # this step's admissions whose K/V come back: (seq, leading blocks it found cached)
        self._prefill_budget = max_batched_tokens  # this step's, from the policy
        self._fitted = None  # (high water, step bytes, allowance) that fit in this step's schedule so far
        self._host_budget = 0  # memory.host_budget() when this step's schedule began
        self._borrow_allowance = 0  # the policy's, for this step
        # Memory cut short a request the step runs (a smaller chunk than it asked): no newcomer joins it,
        # and with prefill_first the next step runs the decodes first.
        self._squeezed = False

    def add(self, seq):
        self.waiting.append(seq)

    def has_work(self):
        return bool(self.waiting or self.running)

    def _allowance(self, seq):
        """Host bytes seq's step may borrow. Alone (running, or admitted into an empty batch), all the host
        budget, as add_request counted on; the policy's limit is on borrowing to run others beside it."""
        if self.preemption != "borrow":
            return 0
        alone = all(other is seq for other in self.running)
        return self._host_budget if alone else self._borrow_allowance

    def _take(self, seq, n, tokens, whole=False):
        """Give seq blocks for n more tokens, or for a smaller prefill chunk (halving: fewer tokens need
        fewer activation bytes) if n does not fit in the step (now `tokens` tokens). whole: only if the
        blocks for all its uncomputed tokens fit too (as vLLM admits a prompt: a prefill started without
        room to finish is preempted halfway and its work lost). Returns the tokens taken, 0 if none fit."""
        while not self._try_take(seq, n, tokens, whole):
            if not self._may_chunk(seq) or n <= self.blocks.block_size or is_decode(seq, n):
                return 0
            n //= 2
        return n

    def _try_take(self, seq, n, tokens, whole):
        extra = self.blocks.blocks_for(len(seq) if whole else seq.num_computed + n) - len(seq.block_table)
        allowance = self._allowance(seq)
        if extra <= 0:  # most decodes: the blocks it holds suffice, only the step's activations may not fit
            return self._fits(self.blocks.high_water, tokens + n, allowance)
        # Many blocks (a long prompt) take a long walk to place: first a bound that costs nothing, which no
        # choice of blocks can beat. A decode's block or two is cheaper to place than to bound.
        if extra > 32 and not self._fits(self.blocks.least_high_water_after(extra), tokens + n, allowance):
            return False
        # Blocks that keep cached prefixes alive first; if they would pin a mapped KV tail the step needs
        # for itself, the lowest free blocks instead.
        for compact in (False, True):
            high_water = self.blocks.high_water_after(extra, compact)
            if high_water is not None and self._fits(high_water, tokens + n, allowance):
                self.blocks.grow(seq, seq.num_computed + n, compact)
                return True
        return False

    def _fits(self, high_water, tokens, allowance):
        """memory.fits, remembering the last answer that fit: nothing the pool holds changes while a step
        is scheduled, but preemption (which resets it), and most decodes add no block and no chunk."""
        key = (high_water, self.memory.step_bytes(tokens), allowance)
        if key == self._fitted:
            return True
        if not self.memory.fits(high_water, tokens, allowance):
            return False
        self._fitted = key
        return True

    def _preempt(self, seq):
        swap = self.preemption == "swap" or (self.preemption == "auto" and
                                             self.swap.worth_swapping(seq, self.blocks.shared_tokens(seq)))
        swapped = swap and self.swap.swap_out(
            seq, self.policy.host_allowance(self.memory.pool.host_budget_bytes))
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.preempt(swapped)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self._fitted = None

    def smallest_first_step(self, num_tokens):
        """Tokens in the smallest first step of a request with num_tokens to prefill: a chunk halves down to a
        block's worth, or to what one step may run; with chunked prefill off it runs all of them."""
        if not self.chunked_prefill:
            return num_tokens
        return min(num_tokens, self.blocks.block_size, self.max_batched_tokens)

    def fits_whole_alone(self, num_tokens):
        """Whether a request of num_tokens tokens could take blocks for all of them, beside its smallest
        first step, with nothing else running: how a prompt is admitted."""
        return self.memory.fits_alone(self.blocks.blocks_for(num_tokens), self.smallest_first_step(num_tokens))

    def _may_chunk(self, seq):
        """Chunked prefill, or a request preempted by recompute whose prompt and generated tokens have
        grown past what one step may run, or fits: in one piece it could never run again."""
        return (self.chunked_prefill or seq.num_uncomputed > self.max_batched_tokens or seq.num_preemptions > 0
                and not self.memory.fits_alone(self.blocks.blocks_for(len(seq)), seq.num_uncomputed))

    def _chunk(self, seq, tokens, prefill_tokens):
        """Tokens of seq to run in a step that has `tokens` so far, `prefill_tokens` of them prefill: all
        it has left, or a chunk where it may be chunked (0: none)."""
        room, left = self.max_batched_tokens - tokens, seq.num_uncomputed
        # A prefill: the policy limits those, but not a step's first where prefills cannot be chunked
        # (a prompt longer than the policy's budget would never run), unless the policy wants none.
        if not is_decode(seq, left) and (self.chunked_prefill or prefill_tokens or not self._prefill_budget):
            room = min(room, self._prefill_budget - prefill_tokens)
        n = max(0, min(left, room))
        return n if n == left or self._may_chunk(seq) else 0

    def schedule(self):
        """The step's (sequence, new tokens) pairs, prefills first; [] when nothing can run. With
        prefill_first a first pass schedules prefills only, and admits beside them only after the running
        decodes' next blocks are held (a prompt admitted into their room would be preempted at once); a
        step that finds no prefill so is scheduled as by default, and then holds decodes. After a step
        whose prefill memory cut short, the decodes run alone first."""
        chunks, preemptions = [], self.num_preemptions
        self.swapped_in, self._fitted, self._host_budget = [], None, self.memory.host_budget()
        # The KV's device bytes stand for the running requests': more (its free tail, cached blocks), so
        # they err towards borrowing less.
        self._borrow_allowance = self._host_budget and self.policy.borrow_allowance(
            self._host_budget, self.running, self.memory.kv.device_bytes)
        squeezed, self._squeezed = self._squeezed, False
        if self.prefill_first and squeezed:
            # Memory cut the last step's prefill short while decodes hold it: they run now, and as they
            # finish they give the prefill its room back (waiting, they would keep it cut short).
            self._continue(chunks, decodes=True, prefills=False)
            if chunks:
                return chunks
        now = time.perf_counter()
        queue = self.policy.order(self.waiting, self.running, now)
        self._prefill_budget = self.policy.prefill_tokens(self.max_batched_tokens, self.running, queue, now)
        if self.prefill_first:
            stuck = self._continue(chunks, decodes=False)
            if self._hold_decode_blocks(chunks):
                self._admit_queue(chunks, queue, preemptions, stuck, idle=not chunks and not self.running,
                                  decodes=False)
            if stuck or chunks:  # prompts' chunks only (one of a single token runs as a decode does)
                return sorted(chunks, key=lambda c: is_decode(*c))
        stuck = self._continue(chunks, decodes=True)
        self._admit_queue(chunks, queue, preemptions, stuck, idle=not chunks, decodes=True)
        return sorted(chunks, key=lambda c: is_decode(*c))

    def _hold_decode_blocks(self, chunks):
        """prefill_first: give the running decodes the blocks of their next tokens now. False if they do
        not all fit beside the step so far: then no prompt is admitted into their room."""
        tokens, _ = self._tokens(chunks)
        return all(self._try_take(seq, 1, tokens, False) for seq in self.running
                   if seq.status is Status.RUNNING and is_decode(seq, seq.num_uncomputed))

    def _decodes_when_back(self, seq):
        """Whether seq comes back from swap to a decode, known without taking its cached prefix blocks
        (which _admit would then give back, at every step it waits)."""
        return self.swap.holds(seq) and self.swap.num_computed(seq) == len(seq) - 1

    def _admit_queue(self, chunks, queue, preemptions, stuck, idle, decodes):
        """Admit waiting requests in the policy's order (queue) while they fit, appending their first
        chunks; with `decodes` False, not those whose first chunk is a decode (back from swap, or left one
        token by the prefix cache): a later pass admits them. None in a step that preempted (as vLLM),
        unless it is idle (nothing else runs): the request just preempted would be readmitted into the
        room it left, and preempted again next step."""
        if stuck or self.num_preemptions != preemptions and not idle:
            return
        if self.num_preemptions != preemptions:  # the requests preempted joined the queue
            queue = self.policy.order(self.waiting, self.running, time.perf_counter())
        admit = [seq for seq in queue if seq.status is Status.WAITING  # a first pass may have taken some
                 and (decodes or not self._decodes_when_back(seq))]
        max_running = self.policy.max_running(self.max_num_seqs, self.running, admit) if admit else 0
        tokens, prefill_tokens = self._tokens(chunks)
        for seq in admit:
            # Once memory has cut short a request the step runs (a running one, or the last admitted), a
            # newcomer would take the room that request needs next step, and be preempted for it (its
            # prefill lost).
            if len(self.running) >= max_running or self._squeezed and self.running:
                break
            swapped = self.swap.holds(seq)
            n, cached = self._admit(seq, tokens, prefill_tokens, decodes)
            if n is None:  # a decode, in a pass without them: it waits for the decode pass
                continue
            if n == 0:
                break
            if swapped:
                self.swapped_in.append((seq, cached // self.blocks.block_size))
            else:
                seq.num_cached_tokens += cached
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append((seq, n))
            tokens += n
            prefill_tokens += n

    @staticmethod
    def _tokens(chunks):
        """(new tokens, prefill tokens) of a step's chunks so far."""
        tokens = sum(n for _, n in chunks)
        return tokens, tokens - sum(is_decode(seq, n) for seq, n in chunks)

    def _continue(self, chunks, decodes, prefills=True):
        """Append to chunks the running requests' next tokens (their decodes only if `decodes`, their
        prefills only if `prefills`), preempting the latest to make room where they do not fit. Returns
        whether a request alone is stuck."""
        tokens, prefill_tokens = self._tokens(chunks)
        scheduled = {id(seq) for seq, _ in chunks}  # in a first pass, or admitted in it
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted below to make room for an earlier request
            if id(seq) in scheduled or not (decodes if is_decode(seq, seq.num_uncomputed) else prefills):
                continue
            n = self._chunk(seq, tokens, prefill_tokens)
            if n == 0:
                continue
            while not (taken := self._take(seq, n, tokens)):
                if self.running == [seq]:
                    # Alone and no room. Preempted and admitted again, it may fit in other blocks; but if
                    # it was here before at this length (another tenant grew), it would loop for ever:
                    # it waits with its KV kept, no one is admitted into its room, and step() says why.
                    if seq.lone_preemption_at == len(seq):
                        return True
                    seq.lone_preemption_at = len(seq)
                self._preempt(self.running[-1])
                if seq.status is not Status.RUNNING:
                    break
            else:
                chunks.append((seq, taken))
                tokens += taken
                prefill_tokens += 0 if is_decode(seq, taken) else taken
                self._squeezed = self._squeezed or taken < n
        return False

    def _admit(self, seq, tokens, prefill_tokens, decodes=True):
        """Blocks for waiting seq's first chunk in a step that has `tokens` so far: (tokens it runs, tokens
        found in the prefix cache), or (0, 0) with seq as it was if it does not fit, or (None, 0) if that
        chunk is a decode and `decodes` is False (its prefix cache left it one token). It takes the cached
        blocks of its prefix (a swapped request too: shared, not copied back twice), unless they sit so
        high that the KV cache's mapped tail they pin does not fit the step: then it runs without them."""
        swapped = self.swap.holds(seq)
        held = self.swap.num_computed(seq) if swapped else 0
        # Blocks for all its tokens up front, as add_request made sure a prompt can have. A request that
        # recompute has grown past that takes its chunks one by one, borrowing room from its own KV, and
        # only alone: beside others it would be preempted halfway again and again.
        whole = self.fits_whole_alone(len(seq))
        if not whole and self.running:
            return 0, 0
        cached = self.blocks.take_cached(seq)
        while True:
            seq.num_computed = max(held, cached)
            n = self._chunk(seq, tokens, prefill_tokens)
            decode = is_decode(seq, n)
            taken = n and (decodes or not decode) and self._take(seq, n, tokens, whole=whole)
            if taken:
                self._squeezed = self._squeezed or taken < n
                return taken, cached
            self.blocks.free(seq)  # the cached blocks too: a waiting request holds none
            seq.num_computed = held
            if decode and not decodes:
                return None, 0
            if not (n and cached):  # the step has no room for its tokens: not the cached blocks' doing
                return 0, 0
            cached = 0

    def undo_swap_ins(self):
        """The step failed before this step's swapped-in requests got their K/V back: they return to the
        front of the queue, blocks freed, K/V still in host memory."""
        for seq, _ in reversed(self.swapped_in):
            self.running.remove(seq)
            self.blocks.free(seq)
            seq.num_computed = self.swap.num_computed(seq)  # not what cached blocks covered: those are gone
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)
        self.swapped_in = []

    def finish(self, seq):
        """Forget a finished or aborted request and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        self.swap.discard(seq)
