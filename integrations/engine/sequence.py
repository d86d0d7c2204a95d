"""One request as the engine sees it: its tokens, its KV blocks and its timings."""
import enum
import time

import torch


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id, prompt_token_ids, params, ttft_slo=None, tpot_slo=None, arrival=None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)  # one list, shared by every output of the request
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        self.ttft_slo = ttft_slo
        self.tpot_slo = tpot_slo
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.block_table = []
        self.block_hashes = []  # chain hashes of block_table's leading full blocks (prefix caching)
        self.num_cached_tokens = 0  # tokens found in the prefix cache, over all admissions
        self.finish_reason = None
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.first_token_time = None
        self.finish_time = None
        self.num_preemptions = 0
        self.lone_preemption_at = None  # its length when it last had to preempt itself with nothing else running
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    def __len__(self):
        return len(self.token_ids)

    @property
    def output_token_ids(self):
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self):
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self):
        """Tokens to run before the next token can be sampled (the whole prompt, or 1 when decoding)."""
        return len(self.token_ids) - self.num_computed

    @property
    def max_len(self):
        return self.num_prompt_tokens + self.params.max_tokens

    def append(self, token_id, now):
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_ids.append(token_id)

    def finish(self, reason, now):
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finish_time = now

    def preempt(self, swapped):
        """Back to waiting. Swapped, its K/V wait in host memory; else (recompute) they are dropped and
        its prompt and generated tokens are prefilled again."""
        if not swapped:
            self.num_computed = 0
        self.status = Status.WAITING
        self.num_preemptions += 1
