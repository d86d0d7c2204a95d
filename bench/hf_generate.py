"""Benchmark of Hugging Face generate on ElasticCache (issue 5) against transformers' own caches.

For each model and (batch, prompt, new tokens) shape, in the same run and process: ElasticCache,
DynamicCache, StaticCache and, on CUDA only (it asserts on a CPU torch), the offloaded cache.
  - tokens/s: batch * new tokens / wall time of generate (prefill included), best of --repeats;
  - peak kv bytes: ElasticCache's pool peak (measured); StaticCache's preallocated tensors;
    DynamicCache's final tensors plus one tensor, the copy torch.cat briefly holds beside it;
  - peak memory: on CPU the process RSS above its level before the call (sampled every ms); on
    CUDA torch's peak allocated bytes above the level before, plus the ElasticCache pool's peak.
Then the longest generation whose kv fits a fixed budget (batch 1): ElasticCache is run against
a pool with that budget until it raises OutOfMemoryError (measured), once without and once with
an equal host budget to borrow from; StaticCache and DynamicCache are computed from the layer
shapes (StaticCache preallocates exactly; DynamicCache needs one more tensor during torch.cat).
On CUDA this part runs only with --longest (minutes a model); the pool code is the same on the CPU.

Models: SmolLM2-135M (the real GGUF if installed, else random weights of its shapes) and a
random-weight Llama with wider kv rows (on CUDA, Llama-3-8B shapes with 4 layers).
Writes bench/results/hf_generate_<cpu|cuda>.json and .png and prints the ratio table.
usage: python bench/hf_generate.py [--device cpu|cuda] [--quick] [--threads N] [--repeats N] [--longest]
"""
import argparse
import json
import math
import platform
import threading
import time
from pathlib import Path

import torch
import transformers
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import torch_ellm
from torch_ellm import Pool
from torch_ellm.integrations.engine.attention import BACKENDS
from torch_ellm.integrations.hf import ElasticCache, _cache_kwarg

RESULTS = Path(__file__).resolve().parent / "results"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

SHAPES = {  # (batch, prompt tokens, new tokens); --quick runs the 1k-token case on the faster model only
    "quick": {"small": [(1, 32, 64), (4, 32, 64)], "wide": [(1, 32, 128), (4, 64, 128), (1, 64, 1024)]},
    "full": {size: [(1, 32, 128), (4, 64, 256), (16, 128, 128), (1, 64, 1024), (1, 512, 2048)]
             for size in ("small", "wide")},
}
SMOLLM2_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
WIDE_KV = {  # more kv bytes per token than SmolLM2 (8 kv heads of 128); on CPU fewer weights, for speed
    "cpu": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, head_dim=128,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192),
    "cuda": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072),
}


def random_llama(shapes, device, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(**shapes, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def load_models(device, dtype):
    """[(size, name, model)]: SmolLM2 first, then the wide-kv random Llama."""
    try:
        from torch_ellm.integrations.models import load_smollm2

        small = ("small", "SmolLM2-135M", load_smollm2(dtype=dtype)[0].to(device))
    except FileNotFoundError:
        small = ("small", "SmolLM2-135M shapes (random)", random_llama(SMOLLM2_SHAPES, device, dtype))
    wide = random_llama(WIDE_KV[device.type], device, dtype)
    c = wide.config
    return [small, ("wide", f"Llama {c.hidden_size}x{c.num_hidden_layers} kv {c.num_key_value_heads}x{c.head_dim} "
                            "(random)", wide)]


def row_bytes(model, batch):
    """Bytes one token adds to one key or value tensor of one layer."""
    c = model.config
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    return batch * c.num_key_value_heads * head_dim * model.dtype.itemsize


class PeakMemory:
    """Peak memory above the level at entry: process RSS sampled every ms on CPU, torch's peak
    allocated bytes on CUDA."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = self.rss()
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = self.peak - self.start

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)


def make_cache(kind, model, max_len, device, chunk):
    if kind == "elastic":
        pool = Pool("host" if device.type == "cpu" else "cuda", device=device.index or 0, chunk_bytes=chunk)
        return ElasticCache(model.config, max_cache_len=max_len, pool=pool)
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config, offloading=kind == "offloaded")


def kv_peak_bytes(kind, cache):
    if kind == "elastic":
        return next(iter(cache.pools.values())).stats()["device_peak_bytes"]
    sizes = [t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)]
    return sum(sizes) + (max(sizes) if kind == "dynamic" else 0)


def run_once(model, kind, batch, prompt, new, device, chunk):
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device)
    cache = make_cache(kind, model, prompt + new, device, chunk)
    with PeakMemory(device) as memory, sdpa_kernel(BACKENDS):  # no per-shape cuDNN plans, as in the engine
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, **{_cache_kwarg(model): cache})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    kv = kv_peak_bytes(kind, cache)
    peak = memory.bytes + (kv if kind == "elastic" and device.type == "cuda" else 0)  # pool is outside torch
    live = 2 * model.config.num_hidden_layers * (prompt + new - 1) * row_bytes(model, batch)
    if kind == "elastic":
        cache.release()
    return {"tokens_per_s": batch * new / seconds, "seconds": seconds, "kv_peak_bytes": kv,
            "live_kv_bytes": live, "memory_peak_bytes": peak}


def longest_elastic(model, budget, host_budget, device, chunk, prompt=32):
    """Tokens in the cache when an ElasticCache under this budget runs out of memory."""
    layers = model.config.num_hidden_layers
    cap = int(1.1 * (budget + host_budget) / (2 * layers * row_bytes(model, 1)))
    pool = Pool("host" if device.type == "cpu" else "cuda", device=device.index or 0, chunk_bytes=chunk,
                budget_bytes=budget, host_budget_bytes=host_budget)
    cache = ElasticCache(model.config, max_cache_len=prompt + cap, pool=pool)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), device=device)
    try:
        model.generate(input_ids=ids, max_new_tokens=cap, min_new_tokens=cap, do_sample=False,
                       **{_cache_kwarg(model): cache})
        raise RuntimeError(f"budget {budget} did not run out within {cap} tokens; raise the cap")
    except torch_ellm.OutOfMemoryError:
        tokens = min(layer.get_seq_length() for layer in cache.layers)  # fully cached in every layer
    borrowed = pool.stats()["borrowed_peak_bytes"]
    cache.release()
    return tokens, borrowed


def longest_at_budget(model, budget, device, chunk):
    tensors, row = 2 * model.config.num_hidden_layers, row_bytes(model, 1)
    elastic, _ = longest_elastic(model, budget, 0, device, chunk)
    borrowing, borrowed = longest_elastic(model, budget, budget, device, chunk)
    return {"budget_bytes": budget, "elastic": elastic, "elastic_with_host_borrowing": borrowing,
            "host_bytes_borrowed": borrowed, "static": budget // (tensors * row),
            "dynamic": budget // ((tensors + 1) * row)}


def ratio(a, b):
    return a / b if b else float("nan")


def print_tables(results, kinds):
    others = [k for k in kinds if k != "elastic"]
    head = "  ".join(f"{'tok/s ' + k:>14}" for k in others) + "  " + "  ".join(f"{'kv ' + k:>12}" for k in others)
    head += "  " + "  ".join(f"{'mem ' + k:>12}" for k in others)
    print("\nElasticCache / baseline (tokens/s: >1 is faster; kv and memory peaks: <1 is smaller)")
    print(f"{'model':<38}{'batch,prompt,new':>18}  {head}  {'elastic kv <= live + 1 chunk/tensor':>10}")
    for r in results["runs"]:
        e = r["elastic"]
        cells = [ratio(e["tokens_per_s"], r[k]["tokens_per_s"]) for k in others]
        cells += [ratio(e["kv_peak_bytes"], r[k]["kv_peak_bytes"]) for k in others]
        cells += [ratio(e["memory_peak_bytes"], r[k]["memory_peak_bytes"]) for k in others]
        shape = ",".join(map(str, r["shape"]))
        print(f"{r['model']:<38}{shape:>18}  " + "  ".join(f"{c:>12.2f}" for c in cells)
              + f"  {str(r['kv_within_one_chunk_per_tensor']):>10}")
    print("\nAbsolute: tokens/s, peak kv MiB, peak memory MiB per cache")
    for r in results["runs"]:
        cells = "  ".join(f"{k}: {r[k]['tokens_per_s']:6.1f} {r[k]['kv_peak_bytes'] / MiB:7.2f} "
                          f"{r[k]['memory_peak_bytes'] / MiB:7.2f}" for k in kinds)
        print(f"{r['model']:<38}{','.join(map(str, r['shape'])):>18}  {cells}")
    print("\nLongest context (tokens cached, batch 1) whose kv fits the budget")
    for name, l in results["longest"].items():
        print(f"{name:<38} budget {l['budget_bytes'] / MiB:.0f} MiB: elastic {l['elastic']}, elastic + host borrowing "
              f"{l['elastic_with_host_borrowing']}, static {l['static']}, dynamic {l['dynamic']}  -> elastic/static "
              f"{ratio(l['elastic'], l['static']):.3f}, elastic/dynamic {ratio(l['elastic'], l['dynamic']):.3f}, "
              f"with borrowing/static {ratio(l['elastic_with_host_borrowing'], l['static']):.2f}")


def plot(results, kinds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = [f"{r['model'].split(' ')[0]}\n{','.join(map(str, r['shape']))}" for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        xs = [j + i * width for j in range(len(runs))]
        axes[0].bar(xs, [r[kind]["tokens_per_s"] for r in runs], width, label=kind)
        axes[1].bar(xs, [r[kind]["kv_peak_bytes"] / MiB for r in runs], width, label=kind)
    for ax, title in zip(axes[:2], ["tokens/s", "peak kv MiB"]):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(runs))], labels, fontsize=7)
        ax.set_title(title)
        ax.legend()
    axes[1].set_yscale("log")
    names = list(results["longest"])
    columns = ["elastic", "elastic_with_host_borrowing", "static", "dynamic"]
    for i, column in enumerate(columns):
        axes[2].bar([j + i * 0.2 for j in range(len(names))], [results["longest"][n][column] for n in names], 0.2,
                    label=column)
    axes[2].set_xticks([j + 0.3 for j in range(len(names))], [n.split(" ")[0] for n in names])
    axes[2].set_title("longest context at a fixed kv budget (tokens)")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"HF generate, {results['device_name']}, torch {torch.__version__}, "
                 f"transformers {transformers.__version__}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="three shapes, one repeat: a few minutes on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per case; the fastest counts")
    parser.add_argument("--longest", action="store_true",
                        help="also measure the longest context on CUDA (the CPU always does): at a 1 GiB budget that "
                             "is some 50,000 decode steps a model, too long for a GPU suite")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chunk = 2 * MiB if device.type == "cuda" else 16 * KiB
    repeats = args.repeats or (1 if args.quick else 2)
    kinds = ["elastic", "dynamic", "static"] + (["offloaded"] if device.type == "cuda" else [])
    budget = 1 * GiB if device.type == "cuda" else 16 * MiB
    results = {"device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "torch": torch.__version__,
               "transformers": transformers.__version__, "threads": torch.get_num_threads(), "chunk_bytes": chunk,
               "repeats": repeats, "runs": [], "longest": {}}
    for size, name, model in load_models(device, dtype):
        run_once(model, "dynamic", 1, 8, 8, device, chunk)  # warm-up
        for batch, prompt, new in SHAPES["quick" if args.quick else "full"][size]:
            row = {"model": name, "shape": [batch, prompt, new]}
            for _ in range(repeats):
                for kind in kinds:
                    r = run_once(model, kind, batch, prompt, new, device, chunk)
                    if kind not in row or r["tokens_per_s"] > row[kind]["tokens_per_s"]:
                        row[kind] = r
            e = row["elastic"]
            row["kv_within_one_chunk_per_tensor"] = (
                e["kv_peak_bytes"] - e["live_kv_bytes"] < 2 * model.config.num_hidden_layers * chunk)
            print(f"{name} {batch},{prompt},{new}: " + ", ".join(
                f"{k} {row[k]['tokens_per_s']:.1f} tok/s" for k in kinds), flush=True)
            results["runs"].append(row)
        if device.type == "cpu" or args.longest:
            results["longest"][name] = longest_at_budget(model, budget, device, chunk)
    print_tables(results, kinds)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"hf_generate_{device.type}.json"
    out.write_text(json.dumps(results, indent=1))
    plot(results, kinds, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
