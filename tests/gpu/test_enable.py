"""torch_ellm.enable() on CUDA. Each check runs in a fresh interpreter: enable() must come before
CUDA is initialized, and a pluggable allocator can be swapped in once per process."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.gpu


def run_python(code, timeout=600):
    """Runs code in a fresh interpreter; returns the JSON object it prints last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"subprocess failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# A small Llama with seeded random weights: logits for a fixed batch and greedy tokens.
MODEL_RUN = """
import json, sys, torch, torch_ellm
from transformers import LlamaConfig, LlamaForCausalLM
enabled = {enable}
if enabled:
    torch_ellm.enable()
config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
with torch_ellm.tag("weights"):
    model = model.cuda()
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
ids = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
with torch.no_grad():
    logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids))
torch.save(logits.cpu(), {logits_path!r})
out = {{"tokens": tokens.tolist(), "weight_bytes": weight_bytes}}
if enabled:
    s = torch_ellm.memory_stats()
    out["weights_tagged"] = s["ellm.tag.weights.device_bytes"]
    out["allocated_peak"] = s["allocated_bytes.all.peak"]
print(json.dumps(out))
"""


def test_model_outputs_match_native(tmp_path):
    native = run_python(MODEL_RUN.format(enable=False, logits_path=str(tmp_path / "native.pt")))
    ours = run_python(MODEL_RUN.format(enable=True, logits_path=str(tmp_path / "ellm.pt")))
    assert ours["tokens"] == native["tokens"]
    assert torch.equal(torch.load(tmp_path / "ellm.pt"), torch.load(tmp_path / "native.pt"))
    # Weights were moved inside tag("weights"): the pool counts at least their bytes there.
    assert ours["weights_tagged"] >= ours["weight_bytes"]
    assert ours["allocated_peak"] >= ours["weight_bytes"]


def test_record_stream_delays_reuse():
    out = run_python("""
        import json, torch, torch_ellm
        torch_ellm.enable()
        side = torch.cuda.Stream()
        x = torch.ones(1 << 20, device="cuda")  # 4 MiB, a large block
        address = x.data_ptr()
        side.wait_stream(torch.cuda.current_stream())
        # x's use on side goes first: a kernel's first launch (lazy loading) and side's first small block (a
        # fresh chunk) may wait for the device to go idle, which would drain a sleep queued before them.
        with torch.cuda.stream(side):
            total = x.sum()
            torch.cuda._sleep(int(2e8))  # keeps the side stream busy; free's event lands behind it
        x.record_stream(side)
        del x
        # The side stream may still read the block: it must not come back yet. (busy stays alive,
        # so that after the sync the only cached 4 MiB block is x's.)
        busy = torch.empty(1 << 20, device="cuda")
        reused_while_busy = busy.data_ptr() == address
        side_was_busy = not side.query()
        side.synchronize()
        again = torch.empty(1 << 20, device="cuda")
        print(json.dumps({"reused_while_busy": reused_while_busy, "reused_after_sync": again.data_ptr() == address,
                          "side_was_busy": side_was_busy, "total": total.item()}))
    """)
    assert out["total"] == 1 << 20
    assert out["side_was_busy"], "the side stream finished before the reuse check: the test proves nothing"
    assert not out["reused_while_busy"]
    assert out["reused_after_sync"]


def test_out_of_memory_raises_torch_error_and_recovers():
    out = run_python("""
        import json, torch, torch_ellm
        torch_ellm.enable(budget="256MiB")
        try:
            torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
            raised = None
        except torch.OutOfMemoryError as e:
            raised = str(e)
        y = torch.ones(1 << 20, device="cuda")
        s = torch_ellm.memory_stats()
        print(json.dumps({"raised": raised, "sum": y.sum().item(), "num_ooms": s["num_ooms"]}))
    """)
    assert out["raised"] is not None, "no torch.OutOfMemoryError"
    assert "budget" in out["raised"]
    assert out["sum"] == 1 << 20
    assert out["num_ooms"] == 1


def test_stats_summary_and_empty_cache():
    out = run_python("""
        import json, torch, torch_ellm
        torch_ellm.enable()
        x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        held = torch_ellm.memory_stats()
        del x
        torch.cuda.empty_cache()  # reaches the pool through the reset hook
        print(json.dumps({"keys": sorted(held), "held": held["allocated_bytes.all.current"],
                          "reserved_after": torch_ellm.memory_stats()["reserved_bytes.all.current"],
                          "summary": torch_ellm.memory_summary()}))
    """)
    for key in ["allocated_bytes.all.current", "allocated_bytes.all.peak", "reserved_bytes.all.current",
                "reserved_bytes.all.peak", "num_alloc_retries", "num_ooms", "ellm.borrowed_bytes",
                "ellm.tag.weights.device_bytes", "ellm.tag.activations.device_bytes", "ellm.tag.kv.device_bytes"]:
        assert key in out["keys"]
    assert out["held"] >= 64 << 20
    assert out["reserved_after"] == 0
    assert "Allocated" in out["summary"]


def test_scoped_mem_pool():
    out = run_python("""
        import json, torch, torch_ellm
        torch_ellm.configure("cuda", budget="1GiB")
        pool = torch_ellm.mem_pool()
        with torch.cuda.use_mem_pool(pool):
            inside = torch.full((8 << 20,), 3.0, device="cuda")  # 32 MiB
        outside = torch.ones(8 << 20, device="cuda")
        s = torch_ellm.memory_stats()
        print(json.dumps({"ours": s["allocated_bytes.all.current"], "native": torch.cuda.memory_allocated(),
                          "sum": (inside + outside).sum().item()}))
    """)
    assert out["ours"] >= 32 << 20  # inside came from torch_ellm
    assert out["native"] >= 32 << 20  # outside from PyTorch's own allocator, whose stats still work
    assert out["sum"] == 4 * (8 << 20)


def test_cuda_graph_replays_in_its_private_pool_without_touching_later_tensors():
    out = run_python("""
        import json, torch, torch_ellm
        torch_ellm.enable(budget="1GiB")
        x = torch.ones(1 << 20, device="cuda")  # 4 MiB: large blocks
        side = torch.cuda.Stream()  # warm-up on a side stream, as PyTorch's CUDA graph notes do
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                y = ((x * 2 + 1).relu() * 3)
        torch.cuda.current_stream().wait_stream(side)
        graph, capture = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.graph(graph, stream=capture):
            y = ((x * 2 + 1).relu() * 3)  # intermediates, freed inside the capture
        # Made after the capture on its stream: from a shared cache they would get the intermediates'
        # memory, which every replay writes.
        with torch.cuda.stream(capture):
            later = [torch.full((1 << 20,), 7.0, device="cuda") for _ in range(4)]
        torch.cuda.current_stream().wait_stream(capture)
        results = []
        for value in (1.0, 2.0, 3.0):
            x.fill_(value)
            graph.replay()
            results.append(y[0].item())
        intact = all(bool((t == 7.0).all()) for t in later)
        del graph, y
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the graph is gone: its pool's blocks may go back
        s = torch_ellm.memory_stats()
        print(json.dumps({"results": results, "intact": intact, "reserved": s["reserved_bytes.all.current"],
                          "allocated": s["allocated_bytes.all.current"]}))
    """)
    assert out["results"] == [9.0, 15.0, 21.0]
    assert out["intact"]
    assert out["reserved"] < out["allocated"] + (4 << 20)  # the graph's intermediates (8 MiB or more) went back


# A small random Llama on the GPU under enable(), weights tagged.
ENABLED_MODEL = """
import json, torch, torch_ellm
from transformers import LlamaConfig, LlamaForCausalLM
torch_ellm.enable(budget="2GiB")
config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
torch.manual_seed(0)
with torch_ellm.tag("weights"):
    model = LlamaForCausalLM(config).eval().cuda()
"""

ENGINE_RUN = ENABLED_MODEL + """
from torch_ellm.integrations.engine.llm import LLM
from torch_ellm.integrations.engine.sampling_params import SamplingParams
prompts = [torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 40, 90)]
with torch.no_grad():
    reference = [model.generate(torch.tensor([p]).cuda(), max_new_tokens=12, do_sample=False,
                                attention_mask=torch.ones(1, len(p), dtype=torch.long).cuda())[0, len(p):].tolist()
                 for p in prompts]
llm = LLM(model, mode="elastic", max_model_len=256, max_num_batched_tokens=64, block_size=16)
ids = [llm.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in prompts]
tokens, kept, in_pool = {}, 0, 0
while llm.has_unfinished_requests():
    for o in llm.step():
        tokens[o.request_id] = o.token_ids
    kept = max(kept, llm.pool.policy["keep_free_bytes"])
    # the pool's bytes tagged activations: the model's real activations (cached by the allocator after the step)
    in_pool = max(in_pool, llm.pool.bytes_by_tag()["activations"]["device_bytes"])
print(json.dumps({"same": [tokens[i] for i in ids] == reference,
                  "allocator_pool": torch_ellm.allocator.is_allocator_pool(llm.pool),
                  "kept": kept, "activations_in_pool": in_pool,
                  "kv_peak": max(s["kv_bytes"] for s in llm.metrics.steps)}))
"""


def test_engine_under_enable_shares_the_allocator_pool():
    """KV blocks, weights and activations in one pool: the engine takes the allocator's pool and keeps
    room for the activations, which the allocator maps there; greedy outputs equal HF generate."""
    r = run_python(ENGINE_RUN)
    assert r["same"] and r["allocator_pool"]
    assert r["kept"] > 0 and r["kv_peak"] > 0
    assert r["activations_in_pool"] > 0


HF_RUN = ENABLED_MODEL + """
from torch_ellm.integrations.hf import ElasticCache, _cache_kwarg
ids = torch.randint(1, 512, (2, 24), generator=torch.Generator().manual_seed(2)).cuda()
args = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
with torch.no_grad():
    dynamic = model.generate(**args)  # transformers' own DynamicCache
    cache = ElasticCache(config, 64)
    elastic = model.generate(**args, **{_cache_kwarg(model): cache})
pool = cache.pools[torch.device("cuda", 0)]
print(json.dumps({"same": torch.equal(dynamic, elastic),
                  "allocator_pool": torch_ellm.allocator.is_allocator_pool(pool),
                  "kv_in_pool": torch_ellm.memory_stats()["ellm.tag.kv.device_bytes"]}))
"""


def test_elastic_cache_under_enable_shares_the_allocator_pool():
    r = run_python(HF_RUN)
    assert r["same"] and r["allocator_pool"] and r["kv_in_pool"] > 0
