"""What a step costs: its seconds predicted from the work it runs, fitted online over recent steps. The
SLO policy asks it how many prefill tokens fit beside a step's decodes within a TPOT target and what
reading borrowed KV in host memory adds to a step, and preemption="auto" what prefilling a preempted
request's tokens again would cost."""
import bisect
import itertools
from typing import NamedTuple

from .attention import is_decode
from .linear_fit import LinearFit


class StepWork(NamedTuple):
    tokens: int        # new tokens: what the weights multiply
    pairs: int         # query-key pairs attention scores
    decodes: int       # sequences decoding one token (the rest of the tokens are prefill)
    prefills: int = 0  # sequences running a prefill chunk
    borrowed: int = 0  # KV bytes in host memory while the step ran, which attention reads there


def chunk_pairs(n, computed):
    """Query-key pairs attention scores for n new tokens after `computed` ones: each sees those and
    the new ones up to itself."""
    return n * computed + n * (n + 1) // 2


def step_work(chunks):
    """The work of a step's (sequence, new tokens) chunks, before it runs."""
    tokens = sum(n for _, n in chunks)
    pairs = sum(chunk_pairs(n, seq.num_computed) for seq, n in chunks)
    decodes = sum(is_decode(seq, n) for seq, n in chunks)
    return StepWork(tokens, pairs, decodes, len(chunks) - decodes)


class StepCost(LinearFit):
    """seconds = fixed + per_token * tokens + per_pair * pairs + per_prefill * prefills + per_decode *
    decodes, fitted over the last `window` steps with prefill and the last `window` without, plus
    what reading borrowed KV in host memory costs. The costs per sequence are what tokens and pairs
    miss: attention runs once for each prefill and gathers each decode's blocks (on the CPU a decode
    token costs some three to four prefill tokens; a model of tokens alone put that in the fixed part).

    The cost per borrowed byte is measured, not fitted (host_read_seconds(), at start-up): KV is borrowed
    when contexts are long and batches large, and a fit cannot tell those apart (on the CPU, where host
    memory is all there is, it put 0.73 ns on every borrowed byte)."""

    def __init__(self, window=64, min_steps=8, refit=8, borrowed_byte_seconds=0.0):
        super().__init__(5, window, min_steps, refit)
        self.borrowed_byte_seconds = borrowed_byte_seconds
        self.borrowed_now = 0  # KV bytes in host memory as the coming step is planned: every step pays them

    def observe(self, work, seconds):
        # A long decode-only stretch would otherwise leave tokens and decodes inseparable just as a
        # burst of prompts arrives.
        seconds -= self.borrowed_seconds(work.borrowed)
        self.add((1, work.tokens, work.pairs, work.prefills, work.decodes), seconds, kind=work.prefills > 0)

    def predict(self, tokens, pairs, decodes=0, prefills=0):
        return self.estimate((1, tokens, pairs, prefills, decodes)) + self.borrowed_seconds(self.borrowed_now)

    def fixed_seconds(self):
        """The part of every step's time that no work adds to (on a GPU, mostly reading the weights), less
        the borrowed KV."""
        return self.coefficients()[0]

    def borrowed_seconds(self, nbytes):
        """What reading nbytes of KV in host memory adds to a step."""
        return self.borrowed_byte_seconds * nbytes

    def decode_seconds(self, count, pairs):
        """A step of count decodes alone, scoring pairs in all."""
        return self.predict(count, pairs, decodes=count)

    def extra_seconds(self, tokens, pairs, prefills=1):
        """What adding this prefill work (of `prefills` sequences) to a step is predicted to cost, without
        the step's fixed part."""
        return self.predict(tokens, pairs, prefills=prefills) - self.predict(0, 0)

    def prefill_seconds(self, seqs, step_tokens):
        """What prefilling each of seqs' uncomputed tokens adds to steps of step_tokens tokens, with its
        share of the steps' fixed cost. Asked for a whole queue every step: the formula written out."""
        fixed, per_token, per_pair, per_prefill, _ = self.coefficients()
        per_token += (fixed + self.borrowed_seconds(self.borrowed_now)) / step_tokens
        out = []
        for seq in seqs:
            n = seq.num_uncomputed
            out.append(per_token * n + per_pair * chunk_pairs(n, seq.num_computed) + per_prefill)
        return out

    def max_decodes(self, contexts, seconds):
        """How many of these decodes, taken in order (each one token after its context), a step may run
        and still be predicted to take at most `seconds`; the first always. Asked for every candidate
        every step: the model's formula written out, without a call each."""
        fixed, per_token, per_pair, _, per_decode = self.coefficients()
        fixed += self.borrowed_seconds(self.borrowed_now)
        count, pairs = 0, 0
        for context in contexts:
            pairs += context
            if count and fixed + (per_token + per_decode) * (count + 1) + per_pair * pairs > seconds:
                break
            count += 1
        return count

    def max_prefill(self, decodes, decode_pairs, context, seconds, limit, prompts=()):
        """The most prefill tokens (0..limit) a step with these decodes may add and still be predicted to
        take at most `seconds`, priced after `context` computed tokens (the worst case for n tokens of
        prompts that far along) and as one chunk for each of `prompts` (their token counts, in the
        order they would run) that n tokens reach into, at least one."""
        starts = list(itertools.accumulate(prompts, initial=0))[:-1] or [0]
        lo, hi = 0, limit
        while lo < hi:  # the prediction grows with the prefill: bisect
            mid = (lo + hi + 1) // 2
            pairs = decode_pairs + chunk_pairs(mid, context)
            chunks = bisect.bisect_left(starts, mid)
            fits = self.predict(decodes + mid, pairs, decodes=decodes, prefills=chunks) <= seconds
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return lo
