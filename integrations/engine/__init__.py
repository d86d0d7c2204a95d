"""A paged-KV serving engine on one elastic pool (nano-vllm style)."""
