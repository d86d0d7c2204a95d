"""Runs a Hugging Face Llama-family model from its own modules (embedding, norms, q/k/v/o projections,
rotary embedding, MLP, head) but with our paged attention, so K/V land in the paged cache."""
import torch
from torch.nn.attention import sdpa_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .attention import build_layout, paged_attention, step_backends


class ModelRunner:
    def __init__(self, model, max_model_len):
        inner = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
            raise TypeError(f"{type(model).__name__} is not a Llama-family causal LM (model.model.layers, "
                            "rotary_emb, lm_head)")
        self.model = model.eval()
        self.max_model_len = max_model_len
        self.inner = inner
        config = model.config
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def run(self, chunks, kv_cache, before_layer=None):
        """chunks: (sequence, new token count), prefills first. Writes the new tokens' K/V and returns
        the logits of each sequence's last new token [len(chunks), vocab]. before_layer(i), if given, is
        called before layer i touches its cache (to wait for K/V being copied in)."""
        layout = build_layout(chunks, kv_cache.block_shape[1], self.max_model_len, self.device)
        ids = torch.tensor([t for seq, n in chunks for t in seq.token_ids[seq.num_computed:seq.num_computed + n]],
                           device=self.device)
        positions = torch.tensor([p for seq, n in chunks for p in range(seq.num_computed, seq.num_computed + n)],
                                 device=self.device)
        x = self.inner.embed_tokens(ids)[None]  # [1, tokens, hidden]: HF modules expect a batch dim
        cos, sin = self.inner.rotary_emb(x, positions[None])
        tokens = ids.shape[0]
        with sdpa_kernel(step_backends()):  # entered once a step: it costs some 13 us
            for i, layer in enumerate(self.inner.layers):
                attn = layer.self_attn
                h = layer.input_layernorm(x)
                q = attn.q_proj(h).view(1, tokens, self.num_heads, self.head_dim)
                k = attn.k_proj(h).view(1, tokens, self.num_kv_heads, self.head_dim)
                v = attn.v_proj(h).view(tokens, self.num_kv_heads, self.head_dim)
                q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
                if before_layer:
                    before_layer(i)
                kv_cache.write(i, layout.slots, k[0], v)
                o = paged_attention(q[0], kv_cache.views[i], layout, attn.scaling)
                x = x + attn.o_proj(o.reshape(1, tokens, -1))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = torch.tensor([n for _, n in chunks], device=self.device).cumsum(0) - 1
        return self.model.lm_head(self.inner.norm(x[0, last]))
