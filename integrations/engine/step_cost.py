"""What a step costs: its seconds predicted from the work it runs, fitted online over recent steps. The
SLO policy asks it how many prefill tokens fit beside a step's decodes within a TPOT target."""
from collections import deque

import numpy as np


def step_work(chunks):
    """(new tokens, attention pairs) of a step's (sequence, new tokens) chunks, before it runs: the tokens
    the weights multiply, and the query-key pairs attention scores (n new tokens after c computed ones
    score n*c + n*(n+1)/2 pairs)."""
    tokens = sum(n for _, n in chunks)
    pairs = sum(n * seq.num_computed + n * (n + 1) // 2 for seq, n in chunks)
    return tokens, pairs


class StepCost:
    """seconds = fixed + per_token * tokens + per_pair * pairs, by least squares over the last `window`
    steps, every coefficient kept >= 0 (a feature that fits negative is dropped). Ready after
    `min_steps` steps."""

    def __init__(self, window=64, min_steps=8):
        self.history = deque(maxlen=window)
        self.min_steps = min_steps
        self._coef = None

    @property
    def ready(self):
        return len(self.history) >= self.min_steps

    def observe(self, work, seconds):
        self.history.append((1.0, *work, seconds))
        self._coef = None

    def predict(self, tokens, pairs):
        if self._coef is None:
            self._coef = self._fit()
        return float(self._coef @ np.array([1.0, tokens, pairs]))

    def max_prefill(self, decode_tokens, decode_pairs, seconds, limit):
        """The most prefill tokens (0..limit) a step with these decodes may add and still be predicted to
        take at most `seconds`; fresh prompt tokens score pairs among themselves only (a worst case of one
        prompt, which is what makes long prefills cost more than their token count)."""
        lo, hi = 0, limit
        while lo < hi:  # the prediction grows with the prefill: bisect
            mid = (lo + hi + 1) // 2
            fits = self.predict(decode_tokens + mid, decode_pairs + mid * (mid + 1) // 2) <= seconds
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return lo

    def _fit(self):
        data = np.array(self.history)
        x, y = data[:, :3], data[:, 3]
        active = [0, 1, 2]
        while active:
            coef = np.zeros(3)
            coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
            worst = min(active, key=lambda i: coef[i])
            if coef[worst] >= 0:
                return coef
            active.remove(worst)
        return np.zeros(3)
