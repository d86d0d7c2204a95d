"""A cost model fitted online: seconds = coefficients . features, by least squares over the last
`window` observations of each kind, every coefficient kept >= 0 (a feature that fits negative is
dropped: more work never makes a device faster, whatever the noise says)."""
import operator
from collections import deque

import numpy as np


class LinearFit:
    """Ready after `min_samples` observations. The normal equations are kept as running sums, and every
    `refit` observations the fit moves to the sums as they are then (before the first such point it
    follows every observation): the device does not change faster than that, and an answer that depends
    only on the observations so far, not on when it is asked, leaves callers free to skip asking. The
    solve waits for a question, so a fit no one asks costs only the sums. Each kind
    of observation keeps its own window, so that a long run of one kind (decode-only steps, say) cannot
    push out the others and leave features it never varies to an arbitrary split."""

    def __init__(self, num_features, window=64, min_samples=8, refit=8):
        self.k = num_features
        self.histories = {}  # kind -> deque of (features, seconds)
        self.window, self.min_samples, self.refit = window, min_samples, refit
        self._xtx, self._xty = [[0.0] * num_features for _ in range(num_features)], [0.0] * num_features
        self._coef, self._unfitted = None, 0
        self._fitted_sums = None  # (xtx, xty) as of the last refit, what coefficients() solves

    @property
    def ready(self):
        return sum(map(len, self.histories.values())) >= self.min_samples

    def history(self, kind=0):
        """The window of one kind of observation (StepCost's: True for steps with prefill, False, which
        is 0, for decode-only ones)."""
        return self.histories.get(kind, ())

    def add(self, features, seconds, kind=0):
        history = self.histories.setdefault(kind, deque())
        history.append((tuple(map(float, features)), seconds))
        self._accumulate(*history[-1], 1.0)
        if len(history) > self.window:
            self._accumulate(*history.popleft(), -1.0)
        self._unfitted += 1
        if self._unfitted >= self.refit and self.ready:
            self._fitted_sums = ([row[:] for row in self._xtx], self._xty[:])
            self._coef, self._unfitted = None, 0

    def _accumulate(self, x, seconds, sign):
        # Plain floats: for a few features they are several times faster than numpy calls.
        for i in range(self.k):
            self._xty[i] += sign * x[i] * seconds
            for j in range(self.k):
                self._xtx[i][j] += sign * x[i] * x[j]

    def coefficients(self):
        if self._fitted_sums is None:  # before the first refit: the sums as they are (rarely asked)
            return self._solve(self._xtx, self._xty)
        if self._coef is None:
            self._coef = self._solve(*self._fitted_sums)
        return self._coef

    def _solve(self, xtx, xty):
        return tuple(map(float, self._fit(xtx, xty)))  # plain floats: numpy scalars are slow

    def estimate(self, features):
        return sum(map(operator.mul, self.coefficients(), features))

    def _fit(self, xtx, xty):
        # Features differ in scale by orders of magnitude: solve in units of each one's largest value.
        xtx, xty = np.array(xtx), np.array(xty)
        scale = np.sqrt(np.maximum(np.diag(xtx), 1e-30))
        xtx, xty = xtx / np.outer(scale, scale), xty / scale
        active = list(range(self.k))
        while active:
            coef = np.zeros(self.k)
            a, b = xtx[np.ix_(active, active)], xty[active]
            try:
                coef[active] = np.linalg.solve(a, b)
            except np.linalg.LinAlgError:  # a feature that never varied: the least-norm answer
                coef[active] = np.linalg.lstsq(a, b, rcond=None)[0]
            worst = min(active, key=lambda i: coef[i])
            if coef[worst] >= 0:
                return coef / scale
            active.remove(worst)
        return np.zeros(self.k)
