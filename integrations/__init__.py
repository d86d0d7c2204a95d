"""Integrations: Hugging Face (hf) and the paged-KV serving engine (engine)."""
