"""What a step costs: its seconds predicted from the work it runs, fitted online over recent steps. The
SLO policy asks it how many prefill tokens fit beside a step's decodes within a TPOT target, and
preemption="auto" what prefilling a preempted request's tokens again would cost."""
from collections import deque
from typing import NamedTuple

import numpy as np

from .attention import is_decode


class StepWork(NamedTuple):
    tokens: int   # new tokens: what the weights multiply
    pairs: int    # query-key pairs attention scores
    decodes: int  # sequences decoding one token (the rest of the tokens are prefill)


def step_work(chunks):
    """The work of a step's (sequence, new tokens) chunks, before it runs (n new tokens after c computed
    ones score n*c + n*(n+1)/2 pairs)."""
    tokens = sum(n for _, n in chunks)
    pairs = sum(n * seq.num_computed + n * (n + 1) // 2 for seq, n in chunks)
    return StepWork(tokens, pairs, sum(is_decode(seq, n) for seq, n in chunks))


class StepCost:
    """seconds = fixed + per_token * tokens + per_pair * pairs, by least squares over the last `window`
    steps, every coefficient kept >= 0 (a feature that fits negative is dropped). Ready after
    `min_steps` steps. The normal equations are kept as running sums, and the 3x3 solve is redone
    every `refit` steps: the device does not change faster than that."""

    def __init__(self, window=64, min_steps=8, refit=8):
        self.history = deque()
        self.window, self.min_steps, self.refit = window, min_steps, refit
        self._xtx, self._xty = [[0.0] * 3 for _ in range(3)], [0.0] * 3
        self._coef, self._unfitted = None, 0

    @property
    def ready(self):
        return len(self.history) >= self.min_steps

    def observe(self, work, seconds):
        self.history.append(((1.0, float(work.tokens), float(work.pairs)), seconds))
        self._accumulate(*self.history[-1], 1.0)
        if len(self.history) > self.window:
            self._accumulate(*self.history.popleft(), -1.0)
        self._unfitted += 1

    def _accumulate(self, x, seconds, sign):
        # Plain floats: for a 3-vector they are several times faster than numpy calls.
        for i in range(3):
            self._xty[i] += sign * x[i] * seconds
            for j in range(3):
                self._xtx[i][j] += sign * x[i] * x[j]

    def predict(self, tokens, pairs):
        if self._coef is None or self._unfitted >= self.refit:
            self._coef, self._unfitted = self._fit(), 0
        c = self._coef
        return float(c[0] + c[1] * tokens + c[2] * pairs)

    def extra_seconds(self, tokens, pairs):
        """What adding this work to a step is predicted to cost, without the step's fixed part."""
        return self.predict(tokens, pairs) - self.predict(0, 0)

    def max_prefill(self, decode_tokens, decode_pairs, context, seconds, limit):
        """The most prefill tokens (0..limit) a step with these decodes may add and still be predicted to
        take at most `seconds`, priced as one chunk after `context` computed tokens (n*context +
        n*(n+1)/2 pairs: the worst case for n tokens of prompts that far along)."""
        lo, hi = 0, limit
        while lo < hi:  # the prediction grows with the prefill: bisect
            mid = (lo + hi + 1) // 2
            fits = self.predict(decode_tokens + mid, decode_pairs + mid * context + mid * (mid + 1) // 2) <= seconds
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return lo

    def _fit(self):
        # Features differ in scale by orders of magnitude: solve in units of each one's largest value.
        xtx, xty = np.array(self._xtx), np.array(self._xty)
        scale = np.sqrt(np.maximum(np.diag(xtx), 1e-30))
        xtx, xty = xtx / np.outer(scale, scale), xty / scale
        active = [0, 1, 2]
        while active:
            coef = np.zeros(3)
            a, b = xtx[np.ix_(active, active)], xty[active]
            try:
                coef[active] = np.linalg.solve(a, b)
            except np.linalg.LinAlgError:  # a feature that never varied: the least-norm answer
                coef[active] = np.linalg.lstsq(a, b, rcond=None)[0]
            worst = min(active, key=lambda i: coef[i])
            if coef[worst] >= 0:
                return coef / scale
            active.remove(worst)
        return np.zeros(3)
