"""The serving engine on a cuda pool (issue 6): swap preemption copies K/V to pinned host buffers and
back on a side stream, overlapped with the model layer by layer; outputs equal Hugging Face generate."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import torch_ellm
from torch_ellm.integrations.engine.llm import LLM
from torch_ellm.integrations.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
MiB = 1 << 20
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().cuda()


@pytest.fixture(scope="module")
def prompts_and_reference(model):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 512, (int(n),), generator=gen).tolist()
               for n in torch.randint(100, 250, (16,), generator=gen)]
    with torch.no_grad():
        reference = [model.generate(torch.tensor([p]).cuda(), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    attention_mask=torch.ones(1, len(p), dtype=torch.long).cuda())[0, len(p):].tolist()
                     for p in prompts]
    return prompts, reference


@pytest.mark.parametrize("preemption, host_tier, overlap", [
    ("swap", "auto", True), ("swap", "auto", False), ("swap", "parked", True), ("swap", "parked", False),
    ("auto", "auto", True)])  # auto: its first preemption swaps, as no copy has been measured yet
def test_swap_preemption_matches_hf_generate(model, prompts_and_reference, preemption, host_tier, overlap):
    prompts, reference = prompts_and_reference
    pool = torch_ellm.Pool("cuda", device=0, budget_bytes=1 << 30, host_budget_bytes=256 * MiB, host_tier=host_tier)
    llm = LLM(model, mode="elastic", pool=pool, preemption=preemption, max_model_len=512, max_num_batched_tokens=256,
              block_size=16)
    llm.swap.overlap = overlap
    # Room for the activations and two chunks of KV a layer (2,048 tokens): the 16 requests need about
    # 3,600 (the same run on the host backend with 2 MiB chunks swaps once).
    pool.set_budget(llm.memory.peak_activation_bytes + 2 * 2 * pool.chunk_bytes)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    summary = llm.metrics.summary()
    assert summary["swap_ins"] > 0 and summary["peak_swapped_bytes"] > 0
    assert pool.host_buffer_bytes == 0
    llm.close()
    assert pool.stats()["mapped_device_bytes"] == 0


def test_seeded_sampling_on_cuda_repeats(model):
    """A request's seed makes a CPU generator while the logits are on the GPU: sampling must still work
    and repeat."""
    pool = torch_ellm.Pool("cuda", device=0, budget_bytes=256 * MiB)
    llm = LLM(model, mode="elastic", pool=pool, max_model_len=512, max_num_batched_tokens=256, block_size=16)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=8, seed=7, ignore_eos=True)
    first, second = llm.generate([[1, 2, 3], [1, 2, 3]], params, use_tqdm=False)
    assert first.token_ids == second.token_ids and len(first.token_ids) == 8
    llm.close()


def test_reading_borrowed_kv_is_priced_at_pcie_speed():
    """The SLO policy's price of a borrowed byte (memory.host_read_seconds) on the GPU: host memory read in
    place across PCIe, well below HBM's speed; the pool left as it was."""
    from torch_ellm.integrations.engine.memory import host_read_seconds

    pool = torch_ellm.Pool("cuda", device=0, budget_bytes=1 << 30, host_budget_bytes=512 * MiB)
    if pool.host_tier != "mapped":
        pytest.skip("this driver offers no host-mapped chunks: nothing is read in place")
    seconds = host_read_seconds(pool)
    assert seconds is not None and seconds > 0
    assert 1e9 < 1 / seconds < 200e9  # bytes a second the reads lose: PCIe's order, not HBM's
    assert pool.mapped_device_bytes == 0 and pool.borrowed_bytes == 0
