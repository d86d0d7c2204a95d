"""Paged attention's query tiles: a long prefill split under SCORE_LIMIT gives what one call gives."""
from types import SimpleNamespace

import pytest
import torch

from torch_ellm.integrations.engine import attention
from torch_ellm.integrations.engine.attention import StepLayout, block_rows, paged_attention


@pytest.mark.parametrize("n, ctx", [(40, 40), (17, 40), (1, 40), (40, 64), (600, 1000)])
def test_query_tiles_match_one_call(monkeypatch, n, ctx):
    """n query tokens at the end of a ctx-token context (n == ctx: a whole prompt; fewer: a later chunk)."""
    g = torch.Generator().manual_seed(n * 1000 + ctx)
    heads, kv_heads, head_dim, block_size = 4, 2, 8, 4
    blocks = -(-ctx // block_size)
    cache = torch.randn(blocks + 3, 2, block_size, kv_heads, head_dim, generator=g)
    table = torch.randperm(blocks + 3, generator=g)[:blocks]  # blocks anywhere in the cache, in any order
    q = torch.randn(n + 2, heads, head_dim, generator=g)  # two tokens before this prefill in the step
    layout = StepLayout(prefills=[(2, n, ctx, block_rows(table))], decodes=[], slots=torch.empty(0, dtype=torch.long))
    whole = paged_attention(q, cache, layout, head_dim ** -0.5)[2:]
    monkeypatch.setattr(attention, "kernel_is_fused", lambda q, masked: False)  # as for fp32 on CUDA
    for rows in (1, 3, 16):  # queries per tile
        monkeypatch.setattr(attention, "SCORE_LIMIT", rows * heads * ctx)
        tiled = paged_attention(q, cache, layout, head_dim ** -0.5)[2:]
        torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    # and against attention written out: query i at position ctx - n + i sees keys 0..ctx - n + i
    k, v = (cache[table, i].flatten(0, 1)[:ctx].repeat_interleave(heads // kv_heads, dim=1) for i in (0, 1))
    scores = torch.einsum("qhd,khd->hqk", q[2:], k) * head_dim ** -0.5
    visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)


def test_engine_attention_never_asks_cudnn(monkeypatch):
    """cuDNN's per-shape plans (about 30 ms each on Hopper) are kept out of every step; the caller's own
    SDPA settings are back afterwards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from torch_ellm.integrations.engine import model_runner
    from torch_ellm.integrations.engine.llm import LLM
    from torch_ellm.integrations.engine.sampling_params import SamplingParams

    seen = []

    def recording(*args):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return paged_attention(*args)

    monkeypatch.setattr(model_runner, "paged_attention", recording)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    llm = LLM(LlamaForCausalLM(config).eval(), budget_bytes=1 << 20, chunk_bytes=16 << 10, block_size=4,
              max_num_batched_tokens=32)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], params, use_tqdm=False)
    assert seen and set(seen) == {(False, True, True, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    # A backend the caller turned off stays off inside the engine's steps.
    seen.clear()
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
    llm.close()
    assert seen and set(seen) == {(False, False, True, True)}


def test_decodes_match_attention_written_out():
    """A batch of decodes with different contexts: query head h reads KV head h // (heads / kv_heads)."""
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, block_size = 8, 2, 16, 4
    contexts = [5, 12, 1, 9]
    width = -(-max(contexts) // block_size)
    cache = torch.randn(20, 2, block_size, kv_heads, head_dim, generator=g)
    tables = torch.stack([torch.randperm(20, generator=g)[:width] for _ in contexts])
    mask = (torch.arange(width * block_size) < torch.tensor(contexts)[:, None]).view(len(contexts), 1, 1, -1)
    q = torch.randn(3 + len(contexts), heads, head_dim, generator=g)  # three prefill tokens before them
    layout = StepLayout(prefills=[], decodes=[(3, block_rows(tables.flatten()), mask)], slots=torch.empty(0, dtype=torch.long))
    got = paged_attention(q, cache, layout, head_dim ** -0.5)[3:]
    for row, ctx in enumerate(contexts):
        k, v = (cache[tables[row], i].flatten(0, 1)[:ctx].repeat_interleave(heads // kv_heads, dim=1) for i in (0, 1))
        scores = torch.einsum("hd,khd->hk", q[3 + row], k) * head_dim ** -0.5
        expected = torch.einsum("hk,khd->hd", scores.softmax(-1), v)
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)


def test_cpu_steps_take_the_fused_kernel(monkeypatch):
    """Every SDPA call of a step (a whole prompt, a later chunk, decodes) gets inputs that SDPA's fused
    CPU kernel takes: 3-D ones went to the math path, ten times slower for a 2K-token prompt."""
    from torch.nn.attention import SDPBackend
    from torch.nn import functional

    chosen, sdpa = [], functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        # SDPA's own choice for these inputs (a private function, the one SDPA itself asks)
        chosen.append(torch._fused_sdp_choice(*args, **{k: v for k, v in kwargs.items() if k != "scale"}))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(functional, "scaled_dot_product_attention", recording)
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, block_size = 4, 2, 8, 4
    cache = torch.randn(16, 2, block_size, kv_heads, head_dim, generator=g)
    tables = torch.arange(10).view(2, 5)
    mask = torch.ones(1, 1, 1, 20, dtype=torch.bool)
    q = torch.randn(40 + 17 + 1, heads, head_dim, generator=g)
    layout = StepLayout(prefills=[(0, 40, 40, block_rows(torch.arange(10))), (40, 17, 20, block_rows(tables[0]))],
                        decodes=[(57, block_rows(tables[1]), mask)], slots=torch.empty(0, dtype=torch.long))
    paged_attention(q, cache, layout, head_dim ** -0.5)
    assert chosen == [SDPBackend.FLASH_ATTENTION.value] * 3


def test_fused_kernel_is_assumed_only_where_sdpa_takes_it(monkeypatch):
    """Where it is not, a prompt runs in query tiles under SCORE_LIMIT: the math path would build its
    whole score matrix (128 GiB for a 32K-token prompt)."""
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])

    def gpu(dtype=torch.bfloat16, head_dim=128):
        return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(1, 32, 7, head_dim))

    assert attention.kernel_is_fused(gpu(), masked=False)
    assert attention.kernel_is_fused(gpu(torch.float16, 64), masked=False)
    assert not attention.kernel_is_fused(gpu(), masked=True)  # flash takes no mask
    assert not attention.kernel_is_fused(gpu(torch.float32), masked=False)
    assert not attention.kernel_is_fused(gpu(head_dim=100), masked=False)
    assert not attention.kernel_is_fused(gpu(head_dim=512), masked=False)
    capability[0] = (7, 5)
    assert not attention.kernel_is_fused(gpu(), masked=False)
    cpu = torch.empty(1, 8, 7, 16)
    assert attention.kernel_is_fused(cpu, masked=True)
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        assert not attention.kernel_is_fused(cpu, masked=False)
    finally:
        torch.backends.cuda.enable_flash_sdp(True)


def test_flash_lower_right_is_cuda_only():
    """A later chunk takes CUDA's flash kernel where it can; on the CPU it takes the masked tiles."""
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 9, 8)
    assert attention.flash_lower_right(q, k, k, 8 ** -0.5) is None
