"""How one request is sampled and how long it may run."""
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off; seed makes sampling repeatable."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


def sample(logits, params, generator=None):
    """One token id from a row of logits: argmax at temperature 0, else top-k/top-p filtered sampling."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.cpu()  # a request's seeded generator is a CPU one; one row is cheap to move
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_rows(logits, seqs):
    """A token id for each row of logits, sampled as its sequence's params say. The greedy ones come from
    one argmax over all rows: on a GPU, one copy to the host for the batch instead of one per row."""
    greedy = logits.argmax(-1).tolist()
    return [best if seq.params.temperature == 0 else sample(row, seq.params, seq.generator)
            for row, best, seq in zip(logits, greedy, seqs)]
