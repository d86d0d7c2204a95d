"""Paged attention on CUDA in half precision: a later prefill chunk runs in the flash kernel with its causal
mask aligned to the last key (no mask built, no math path), also under the activation profile's dispatch
mode, and every path agrees with attention written out in float64."""
import pytest
import torch
from torch.nn.attention import sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from torch_ellm.integrations.engine.attention import StepLayout, block_rows, paged_attention, step_backends
from torch_ellm.integrations.engine.memory import _PeakBytes

pytestmark = pytest.mark.gpu
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-3-8B's attention shapes


def written_out(q, cache, table, n, ctx):
    """float64 attention of n queries at the end of a ctx-token context, on the CPU."""
    q, cache, table = q.double().cpu(), cache.double().cpu(), table.cpu()
    k, v = (cache[table, i].flatten(0, 1)[:ctx].repeat_interleave(HEADS // KV_HEADS, dim=1) for i in (0, 1))
    scores = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM ** -0.5
    visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("n, ctx", [(1000, 1000), (700, 3000), (5, 2048), (2048, 2049)])
def test_prefill_chunks_take_flash_and_match_float64(n, ctx):
    g = torch.Generator(device="cuda").manual_seed(n + ctx)
    blocks = -(-ctx // BLOCK)
    cache = torch.randn(blocks + 5, 2, BLOCK, KV_HEADS, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(blocks + 5, generator=g, device="cuda")[:blocks]
    q = torch.randn(n + 3, HEADS, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    layout = StepLayout(prefills=[(3, n, ctx, block_rows(table))], decodes=[], slots=torch.empty(0, dtype=torch.long))
    with profile(activities=[ProfilerActivity.CPU]) as prof, sdpa_kernel(step_backends()):  # as ModelRunner.run
        out = paged_attention(q, cache, layout, HEAD_DIM ** -0.5)
    torch.cuda.synchronize()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention" in ops, sorted(ops)
    assert not any("math" in op for op in ops), sorted(ops)
    expected = written_out(q[3:], cache, table, n, ctx)
    error = (out[3:].double().cpu() - expected).norm() / expected.norm()
    assert error < 1e-2, error
    with _PeakBytes() as peak, sdpa_kernel(step_backends()):  # as the activation profile measures a step
        again = paged_attention(q, cache, layout, HEAD_DIM ** -0.5)
    assert peak.peak > 0 and torch.equal(again[3:], out[3:])
