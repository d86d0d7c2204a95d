"""Benchmark of torch_ellm's caching allocator (issue 3).

CPU (host backend): nanoseconds per alloc/free pair on a seeded mixed-size trace, replayed
  - by a small C loop that calls the entry points through function pointers (the allocator's
    own cost), and
  - by a Python loop through ctypes (what tests see; ctypes dominates, so the cost of one
    ctypes call, torch_ellm_last_error, is measured and reported beside it),
  against glibc malloc/free on the same trace, in the same run, the same two ways.
  Neither side touches the memory it gets: this times bookkeeping and mapping only.
  Also peak reserved over peak allocated (no glibc figure) on that trace, on the GPU loop's sizes, and
  on the GPU generate run's allocations recorded on the CPU (a few minutes; seconds with --quick), and
  how many chunks a warm replay of that recording still maps and unmaps (each a driver call on a GPU).
GPU (CUDA only): torch.empty/del loops of several sizes and a transformers generate run, each in
  a fresh subprocess under PyTorch's caching allocator, expandable_segments:True and
  torch_ellm.enable(): time per op, tokens/s, peak reserved over peak allocated.

Writes bench/results/allocator_<cpu|cuda>.json and prints a table.
usage: python bench/allocator.py [--device cpu|cuda] [--quick]
"""
import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# ---------------------------------------------------------------- CPU, host backend

# A trace is two arrays: sizes[i] > 0 allocates that many bytes into slot slots[i];
# sizes[i] == 0 frees the pointer held in slot slots[i].
REPLAY_C = r"""
#include <stdint.h>
#include <stddef.h>
#include <time.h>
typedef int (*ellm_alloc_t)(ptrdiff_t, int, void*, void**);
typedef int (*ellm_free_t)(void*, int);
typedef void* (*malloc_t)(size_t);
typedef void (*free_t)(void*);

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Replays the trace through torch_ellm's C API (libc == 0) or malloc/free (libc == 1).
   Returns the elapsed nanoseconds, or -1 - i when op i fails. */
int64_t replay(int libc, void* alloc_fn, void* free_fn, int64_t n, const int64_t* sizes, const int64_t* slots,
               void** table) {
  int64_t start = now_ns();
  for (int64_t i = 0; i < n; ++i) {
    void** slot = &table[slots[i]];
    int failed;
    if (sizes[i] > 0)
      failed = libc ? !(*slot = ((malloc_t)alloc_fn)((size_t)sizes[i]))
                    : ((ellm_alloc_t)alloc_fn)(sizes[i], 0, 0, slot) != 0;
    else if (libc)
      ((free_t)free_fn)(*slot), failed = 0;
    else
      failed = ((ellm_free_t)free_fn)(*slot, 0) != 0;
    if (failed) return -1 - i;
  }
  return now_ns() - start;
}
"""


def make_trace(pairs, seed=0, max_live=256):
    """Mostly small requests (log-uniform 16 B to 64 KiB), some medium (to 2 MiB), a few large
    (to 64 MiB); frees interleaved at random, up to max_live blocks live; all freed at the end."""
    rng = random.Random(seed)
    sizes, slots, live, spare = [], [], [], list(range(max_live))
    made = 0
    while made < pairs or live:
        if made < pairs and (not live or (len(live) < max_live and rng.random() < 0.55)):
            r = rng.random()
            lo, hi = (16, 64 * KiB) if r < 0.85 else (64 * KiB, 2 * MiB) if r < 0.97 else (2 * MiB, 64 * MiB)
            slot = spare.pop()
            sizes.append(int(lo * (hi / lo) ** rng.random()))
            slots.append(slot)
            live.append(slot)
            made += 1
        else:
            slot = live.pop(rng.randrange(len(live)))
            sizes.append(0)
            slots.append(slot)
            spare.append(slot)
    return sizes, slots, max_live


def build_replay(folder):
    src, lib = Path(folder) / "replay.c", Path(folder) / "replay.so"
    src.write_text(REPLAY_C)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return ctypes.CDLL(str(lib))


def address(fn):
    return ctypes.cast(fn, ctypes.c_void_p).value


class Cpu:
    def __init__(self, pairs):
        import torch_ellm

        self.torch_ellm = torch_ellm
        self.ellm = ctypes.CDLL(torch_ellm._C.__file__)
        self.ellm.torch_ellm_try_alloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p,
                                                   ctypes.POINTER(ctypes.c_void_p)]
        self.ellm.torch_ellm_try_free.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.ellm.torch_ellm_last_error.restype = ctypes.c_char_p
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.malloc.argtypes, self.libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
        self.libc.free.argtypes = [ctypes.c_void_p]
        self.sizes, self.slots, self.nslots = make_trace(pairs)
        self.pairs = pairs
        n = len(self.sizes)
        self.c_sizes = (ctypes.c_int64 * n)(*self.sizes)
        self.c_slots = (ctypes.c_int64 * n)(*self.slots)
        self.table = (ctypes.c_void_p * self.nslots)()
        # The defaults of enable(): 2 MiB chunks, so slabs serve requests up to 512 KiB.
        torch_ellm.configure("host", budget="8GiB", chunk="2MiB", granularity="2MiB")

    def replay_c(self, replay, which):
        fn = replay.replay
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 3
        pair = ((self.ellm.torch_ellm_try_alloc, self.ellm.torch_ellm_try_free) if which == "ellm"
                else (self.libc.malloc, self.libc.free))
        ns = fn(int(which == "libc"), *(address(f) for f in pair), len(self.sizes), self.c_sizes, self.c_slots, self.table)
        if ns < 0:
            raise RuntimeError(f"{which}: op {-1 - ns} of the trace failed: "
                               f"{self.ellm.torch_ellm_last_error().decode()}")
        return ns / self.pairs

    def replay_ctypes(self, which):
        table, sizes, slots = [None] * self.nslots, self.sizes, self.slots
        start = time.perf_counter_ns()
        if which == "ellm":
            alloc, free, out = self.ellm.torch_ellm_try_alloc, self.ellm.torch_ellm_try_free, ctypes.c_void_p()
            ref = ctypes.byref(out)
            for size, slot in zip(sizes, slots):
                if size:
                    if alloc(size, 0, None, ref):
                        raise RuntimeError(self.ellm.torch_ellm_last_error().decode())
                    table[slot] = out.value
                elif free(table[slot], 0):
                    raise RuntimeError(self.ellm.torch_ellm_last_error().decode())
        else:
            malloc, free = self.libc.malloc, self.libc.free
            for size, slot in zip(sizes, slots):
                if size:
                    table[slot] = malloc(size)
                else:
                    free(table[slot])
        return (time.perf_counter_ns() - start) / self.pairs

    def ctypes_call_ns(self, calls=200_000):
        f = self.ellm.torch_ellm_last_error
        start = time.perf_counter_ns()
        for _ in range(calls):
            f()
        return (time.perf_counter_ns() - start) / calls

    def peak_ratio(self, events):
        """Replay [(bytes, id) to allocate, (0, id) to free] from an empty cache: peak reserved over peak
        allocated, the figure the GPU runs report."""
        self.torch_ellm.empty_cache()
        self.torch_ellm.reset_peak_memory_stats(0)
        self.replay_events(events)
        s = self.torch_ellm.memory_stats(0)
        return s["reserved_bytes.all.peak"] / s["allocated_bytes.all.peak"]

    def warm_chunk_moves(self, events):
        """Replay the events again on the cache the last replay left: (chunks mapped, chunks unmapped),
        each chunk a driver call on a GPU (some 70 and 47 us on the H100)."""
        pool = self.torch_ellm.pool(0)
        log = pool.events()
        since = log[-1]["t"] if log else float("-inf")
        self.replay_events(events)
        moved = {"alloc": 0, "free": 0}
        for e in pool.events():
            if e["t"] > since and e["kind"] in moved:
                moved[e["kind"]] += e["bytes"] // pool.chunk_bytes
        return moved["alloc"], moved["free"]

    def replay_events(self, events):
        """Allocate and free as the events say; whatever is left live is freed at the end."""
        live, out = {}, ctypes.c_void_p()
        for size, key in events:
            failed = (self.ellm.torch_ellm_try_alloc(size, 0, None, ctypes.byref(out)) if size
                      else self.ellm.torch_ellm_try_free(live.pop(key), 0))
            if failed:
                raise RuntimeError(self.ellm.torch_ellm_last_error().decode())
            if size:
                live[key] = out.value
        for ptr in live.values():
            self.ellm.torch_ellm_try_free(ptr, 0)

    def check_empty(self):
        s = self.torch_ellm.memory_stats(0)
        assert s["allocation.all.current"] == 0, s


def run_cpu(quick):
    pairs, repeats = (20_000, 3) if quick else (100_000, 7)
    cpu = Cpu(pairs)
    with tempfile.TemporaryDirectory() as folder:
        replay = build_replay(folder)
        # The first ellm replay maps every chunk (cold); later ones reuse the cache (warm).
        cold = {w: cpu.replay_c(replay, w) for w in ("ellm", "libc")}
        cpu.check_empty()
        runs = {(path, w): [] for path in ("c", "ctypes") for w in ("ellm", "libc")}
        for _ in range(repeats):  # interleaved, so drift hits both sides alike
            for w in ("ellm", "libc"):
                runs["c", w].append(cpu.replay_c(replay, w))
                runs["ctypes", w].append(cpu.replay_ctypes(w))
        cpu.check_empty()
    s = cpu.torch_ellm.memory_stats(0)
    trace_ratio = s["reserved_bytes.all.peak"] / s["allocated_bytes.all.peak"]
    loop = [size for size in LOOP_SIZES for _ in range(100)]  # each allocated and freed at once
    loop_ratio = cpu.peak_ratio([(event, i) for i, size in enumerate(loop) for event in (size, 0)])
    layers, batch, prompt, new = GENERATE_SHAPES[quick]
    generate = record_generate(layers, batch, prompt, new)
    generate_ratio = cpu.peak_ratio(generate)
    generate_mapped, generate_unmapped = cpu.warm_chunk_moves(generate)
    call = statistics.median(cpu.ctypes_call_ns() for _ in range(repeats))
    med = {f"{path}.{w}": statistics.median(v) for (path, w), v in runs.items()}
    n_alloc = sum(1 for x in cpu.sizes if x)
    return {
        "device": "cpu", "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "trace": {"pairs": pairs, "seed": 0, "max_live": cpu.nslots,
                  "small_le_64KiB": sum(1 for x in cpu.sizes if 0 < x <= 64 * KiB) / n_alloc,
                  "large_gt_2MiB": sum(1 for x in cpu.sizes if x > 2 * MiB) / n_alloc},
        "config": {"backend": "host", "chunk": "2MiB", "budget": "8GiB"}, "repeats": repeats,
        "ns_per_pair": {"c.ellm.cold": cold["ellm"], "c.libc.cold": cold["libc"], **med},
        "ctypes_call_ns": call,
        "ctypes_minus_two_calls": {w: med[f"ctypes.{w}"] - 2 * call for w in ("ellm", "libc")},
        "ellm_reserved_peak_bytes": s["reserved_bytes.all.peak"], "ellm_allocated_peak_bytes": s["allocated_bytes.all.peak"],
        "peak_reserved_over_allocated": {"trace": trace_ratio, "gpu_loop_sizes": loop_ratio,
                                         "generate_recorded_on_cpu": generate_ratio},
        "generate_shapes": {"layers": layers, "batch": batch, "prompt": prompt, "new": new},
        # A warm-up generate of 8 tokens and the timed one, replayed on a warm cache: what still maps.
        "generate_warm_replay_chunks": {"mapped": generate_mapped, "unmapped": generate_unmapped},
    }


def print_cpu(r):
    ns = r["ns_per_pair"]
    print(f"CPU host backend, {r['trace']['pairs']} alloc/free pairs "
          f"({r['trace']['small_le_64KiB']:.0%} <= 64 KiB, {r['trace']['large_gt_2MiB']:.1%} > 2 MiB), "
          f"median of {r['repeats']}")
    print(f"{'ns per alloc/free pair':34}{'torch_ellm':>12}{'glibc':>12}{'ratio':>8}")
    rows = [("C loop, first replay (cold)", ns["c.ellm.cold"], ns["c.libc.cold"]),
            ("C loop, warm", ns["c.ellm"], ns["c.libc"]),
            ("ctypes loop, warm", ns["ctypes.ellm"], ns["ctypes.libc"]),
            ("ctypes loop minus 2 ctypes calls", *r["ctypes_minus_two_calls"].values())]
    for name, ours, libc in rows:
        print(f"{name:34}{ours:12.0f}{libc:12.0f}{ours / libc:8.2f}")
    print(f"one ctypes call (torch_ellm_last_error): {r['ctypes_call_ns']:.0f} ns; "
          f"torch_ellm peak reserved / peak allocated: {r['peak_reserved_over_allocated']['trace']:.2f} on the trace, "
          f"{r['peak_reserved_over_allocated']['gpu_loop_sizes']:.3f} on the GPU loop's sizes, "
          f"{r['peak_reserved_over_allocated']['generate_recorded_on_cpu']:.4f} on the GPU generate run's "
          f"allocations recorded on the CPU, whose warm replay maps {r['generate_warm_replay_chunks']['mapped']} "
          f"chunks and unmaps {r['generate_warm_replay_chunks']['unmapped']}")


# ---------------------------------------------------------------- GPU, in fresh subprocesses

MODES = {"native": {}, "expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "ellm": {}}
LOOP_SIZES = [512, 64 * KiB, 2 * MiB, 32 * MiB, 256 * MiB]


def child(workload, mode, quick):
    """Runs in a fresh interpreter: one workload under one allocator; prints a JSON line."""
    import torch

    if mode == "ellm":
        import torch_ellm

        torch_ellm.enable()
    out = loop_workload(torch, quick) if workload == "loop" else generate_workload(torch, quick)
    if mode == "ellm":
        s = torch_ellm.memory_stats()
        reserved, allocated = s["reserved_bytes.all.peak"], s["allocated_bytes.all.peak"]
        # Device memory the pool held at most, unmapped chunks it keeps for reuse included: this, not
        # what the allocator had mapped, is what compares with PyTorch's reserved (cudaMalloc'd) bytes.
        out.update(peak_physical=s["ellm.device_physical_peak_bytes"],
                   physical_ratio=s["ellm.device_physical_peak_bytes"] / allocated)
    else:
        reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
    out.update(peak_reserved=reserved, peak_allocated=allocated, peak_ratio=reserved / allocated)
    print(json.dumps(out))


def loop_workload(torch, quick):
    iters = 2_000 if quick else 20_000
    ns = {}
    for size in LOOP_SIZES:
        for _ in range(100):  # warm the cache
            del_me = torch.empty(size, dtype=torch.uint8, device="cuda")
            del del_me
        torch.cuda.synchronize()
        start = time.perf_counter_ns()
        for _ in range(iters):
            x = torch.empty(size, dtype=torch.uint8, device="cuda")
            del x
        torch.cuda.synchronize()
        ns[str(size)] = (time.perf_counter_ns() - start) / iters
    return {"ns_per_op": ns}


GENERATE_SHAPES = {True: (2, 4, 128, 32), False: (4, 8, 512, 128)}  # quick: layers, batch, prompt, new tokens


def generate_model(torch, layers):
    """Llama-3-8B layer shapes with few layers, bf16, seeded random weights, on the default device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    return LlamaForCausalLM(config).eval()


def run_generate(torch, model, batch, prompt, new, device, sync=lambda: None):
    """A warm-up generate of 8 tokens, then the timed one: (seconds, tokens made)."""
    from torch.nn.attention import sdpa_kernel

    from torch_ellm.integrations.engine.attention import BACKENDS  # imports torch_ellm, enables nothing

    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), min_new_tokens=new)
    # Without cuDNN attention, as the engine runs: on Hopper it would build a plan for every new key
    # length, that is every token, and that host time would hide the allocator's.
    with torch.no_grad(), sdpa_kernel(BACKENDS):
        model.generate(ids, max_new_tokens=8, **{**kwargs, "min_new_tokens": 8})
        sync()
        start = time.perf_counter()
        tokens = model.generate(ids, max_new_tokens=new, **kwargs)
        sync()
    return time.perf_counter() - start, (tokens.shape[1] - prompt) * batch


def generate_workload(torch, quick):
    layers, batch, prompt, new = GENERATE_SHAPES[quick]
    with torch.device("cuda"):
        model = generate_model(torch, layers)
    seconds, made = run_generate(torch, model, batch, prompt, new, "cuda", torch.cuda.synchronize)
    return {"tokens_per_s": made / seconds, "seconds": seconds, "batch": batch, "prompt": prompt, "new": new}


def record_generate(layers, batch, prompt, new):
    """The GPU generate workload run on the CPU, as the allocations a caching allocator would see: every
    new storage in order, freed when the last tensor on it dies. [(bytes, id) or (0, id)]. An
    approximation of the CUDA run (no cuBLAS workspaces; CPU kernels allocate their own scratch)."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    events, live = [], {}  # live: storage -> (weak reference, id)

    class Recorder(TorchDispatchMode):
        def sweep(self):
            for key in [k for k, (ref, _) in live.items() if ref.expired()]:
                events.append((0, live.pop(key)[1]))

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.sweep()
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref.cdata not in live:
                        live[ref.cdata] = (ref, len(events))
                        events.append((t.untyped_storage().nbytes(), len(events)))
            return out

    dtype = torch.get_default_dtype()
    try:
        with Recorder() as recorder:
            run_generate(torch, generate_model(torch, layers), batch, prompt, new, "cpu")
            recorder.sweep()
    finally:
        torch.set_default_dtype(dtype)
    return events


def run_gpu(quick):
    results = {}
    for workload in ("loop", "generate"):
        for mode, env in MODES.items():
            cmd = [sys.executable, __file__, "--child", workload, "--mode", mode] + (["--quick"] if quick else [])
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"{workload} under {mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            results[f"{workload}.{mode}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{workload} under {mode} ({time.perf_counter() - start:.0f} s): {results[f'{workload}.{mode}']}",
                  flush=True)
    import torch

    return {"device": "cuda", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "quick": quick,
            "results": results}


def print_gpu(r):
    res = r["results"]
    print(f"GPU {r['gpu']}, torch {r['torch']}; ratio = mode / native (time: lower is better)")
    print(f"{'':26}" + "".join(f"{m:>14}" for m in MODES) + f"{'expandable/n':>14}{'ellm/n':>10}")

    def row(name, values, digits=1):
        n = values["native"]
        print(f"{name:26}" + "".join(f"{values[m]:14.{digits}f}" for m in MODES) +
              f"{values['expandable'] / n:14.2f}{values['ellm'] / n:10.2f}")

    for size in LOOP_SIZES:
        row(f"empty+del {size} B, ns", {m: res[f"loop.{m}"]["ns_per_op"][str(size)] for m in MODES})
    row("generate tokens/s", {m: res[f"generate.{m}"]["tokens_per_s"] for m in MODES})
    for w in ("loop", "generate"):
        row(f"{w} peak reserved/alloc", {m: res[f"{w}.{m}"]["peak_ratio"] for m in MODES}, 3)
        row(f"{w} ellm: pool physical", {**{m: res[f"{w}.{m}"]["peak_ratio"] for m in MODES},
                                         "ellm": res[f"{w}.ellm"]["physical_ratio"]}, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="cpu: host-backend replay; cuda: the GPU comparisons (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="shorter runs, for a smoke test")
    ap.add_argument("--child", choices=["loop", "generate"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.mode, args.quick)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_cpu(args.quick) if device == "cpu" else run_gpu(args.quick)
    (print_cpu if device == "cpu" else print_gpu)(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"allocator_{device}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
