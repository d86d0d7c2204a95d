"""Per-request latencies and per-run throughput, batch size, memory and overhead."""
from dataclasses import dataclass, field

import numpy as np


def request_metrics(seq):
    """TTFT, TPOT and end-to-end latency (seconds) of a finished request, whether it met its targets, and
    how many of its tokens the prefix cache spared from prefill."""
    ttft = seq.first_token_time - seq.arrival
    outputs = seq.num_output_tokens
    tpot = (seq.finish_time - seq.first_token_time) / (outputs - 1) if outputs > 1 else 0.0
    met = (seq.ttft_slo is None or ttft <= seq.ttft_slo) and (seq.tpot_slo is None or tpot <= seq.tpot_slo)
    return {"ttft": ttft, "tpot": tpot, "e2e": seq.finish_time - seq.arrival, "slo_met": met,
            "output_tokens": outputs, "preemptions": seq.num_preemptions, "cached_tokens": seq.num_cached_tokens}


@dataclass
class RunMetrics:
    """One row per step; summary() turns them and the finished requests into the benchmark's columns."""
    steps: list = field(default_factory=list)
    requests: list = field(default_factory=list)

    def record_step(self, **row):
        self.steps.append(row)

    def summary(self):
        steps, reqs = self.steps, self.requests
        if not steps:
            return {}
        wall = steps[-1]["end"] - steps[0]["start"]
        model = sum(s["model_seconds"] for s in steps)
        overhead = sum(s["overhead_seconds"] for s in steps)
        memory = sum(s["memory_seconds"] for s in steps)  # the part of the overhead that maps and unmaps
        decode_tokens = sum(s["decode_tokens"] for s in steps)
        decode_steps = [s for s in steps if s["decode_tokens"]]
        decode_seconds = sum(s["model_seconds"] + s["overhead_seconds"] for s in decode_steps)
        # Decode tokens/s is bound by prefill that rides along: how much of those steps' time had some.
        mixed_seconds = sum(s["model_seconds"] + s["overhead_seconds"] for s in decode_steps
                            if s["tokens"] > s["decode_batch"])
        batch = np.array([s["batch"] for s in steps])
        decode_batch = np.array([s["decode_batch"] for s in steps])
        ttft = np.array([r["ttft"] for r in reqs] or [np.nan])
        tpot = np.array([r["tpot"] for r in reqs] or [np.nan])
        met = sum(r["slo_met"] for r in reqs)
        return {
            "requests": len(reqs), "steps": len(steps), "wall_seconds": wall,
            "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else 0.0,
            "decode_time_with_prefill_pct": 100 * mixed_seconds / decode_seconds if decode_seconds else 0.0,
            "output_tokens_per_s": sum(r["output_tokens"] for r in reqs) / wall if wall else 0.0,
            "max_batch": int(batch.max()), "mean_batch": float(batch.mean()),
            "max_decode_batch": int(decode_batch.max()), "mean_decode_batch": float(decode_batch.mean()),
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "tpot_p50": float(np.percentile(tpot, 50)), "tpot_p99": float(np.percentile(tpot, 99)),
            "slo_attainment": met / len(reqs) if reqs else 0.0,
            "goodput_rps": met / wall if wall else 0.0,
            "overhead_pct": 100 * overhead / (model + overhead) if model + overhead else 0.0,
            "memory_overhead_pct": 100 * memory / (model + overhead) if model + overhead else 0.0,
            "preemptions": sum(r["preemptions"] for r in reqs),
            "cached_tokens": sum(r["cached_tokens"] for r in reqs),
            "peak_kv_bytes": max(s["kv_bytes"] for s in steps),
            "peak_borrowed_bytes": max(s["borrowed_bytes"] for s in steps),
            "peak_swapped_bytes": max(s["swapped_bytes"] for s in steps),
            "swap_ins": sum(s["swap_ins"] for s in steps),
            "swap_wait_seconds": sum(s["swap_wait_seconds"] for s in steps),
        }
