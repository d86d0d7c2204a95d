"""Benchmark of the pool core (issue 2): mapping and unmapping chunks, and growing a virtual tensor.

- map / unmap: microseconds per 2 MiB chunk when a virtual tensor grows or shrinks one chunk at a
  time, cold (chunks created by the backend: memfd fallocate or cuMemCreate) and warm (chunks from
  the pool's cache), beside allocating and filling a fresh torch buffer of one chunk.
- grow: a virtual tensor grown from 0 to 1 GiB (256 MiB with --quick) in 16 MiB steps, each step's
  new bytes written, against the baseline in the same run: allocate a torch buffer of the grown size,
  copy the old contents into it, write the new bytes (what growing without virtual memory costs).

usage: python bench/pool.py [--device cpu|cuda] [--quick]; writes bench/results/pool_<backend>.json
"""
import torch

from vmbench import GiB, MiB, parse_args, pool, print_table, timed, write_json

CHUNK = 2 * MiB
STEP = 16 * MiB


def map_unmap(device, chunks, repeats):
    """Seconds per chunk: (cold map, warm map, unmap)."""
    p = pool(device, budget=2 * chunks * CHUNK)
    vt = p.virtual_tensor(chunks * CHUNK)

    def grow():
        for i in range(1, chunks + 1):
            vt.resize(i * CHUNK)

    def shrink():
        for i in range(chunks - 1, -1, -1):
            vt.resize(i * CHUNK)

    cold, warm, unmap = [], [], []
    for _ in range(repeats):
        p.trim()
        cold.append(timed(device, grow))
        unmap.append(timed(device, shrink))
        warm.append(timed(device, grow))
        vt.resize(0)
    vt.release()
    return tuple(min(t) / chunks for t in (cold, warm, unmap))


def fresh_buffer(device, repeats):
    """Best seconds to allocate and fill a new torch buffer of one chunk (the allocator's caching
    included). Best, not median: on a shared 2-core machine the median swings tenfold."""
    return min(timed(device, lambda: torch.empty(CHUNK, dtype=torch.uint8, device=device).fill_(1))
               for _ in range(repeats))


def grow_virtual(device, total, warm):
    p = pool(device, budget=total)
    vt = p.virtual_tensor(total)
    if warm:  # leave every chunk in the pool's cache
        vt.resize(total)
        vt.resize(0)

    def run():
        for size in range(STEP, total + 1, STEP):
            vt.resize(size)
            view = vt.as_tensor(size, torch.uint8)
            view[size - STEP:].fill_(1)
            del view

    seconds = timed(device, run)
    vt.release()
    return seconds


def grow_copy(device, total):
    def run():
        buf = torch.empty(0, dtype=torch.uint8, device=device)
        for size in range(STEP, total + 1, STEP):
            new = torch.empty(size, dtype=torch.uint8, device=device)
            new[: size - STEP].copy_(buf)
            new[size - STEP:].fill_(1)
            buf = new

    return timed(device, run)


def main():
    args = parse_args(__doc__)
    device = args.device
    total = (256 * MiB if args.quick else GiB)
    repeats = 3 if args.quick else 5
    chunks = 64

    cold, warm, unmap = map_unmap(device, chunks, repeats)
    buffer = fresh_buffer(device, 50)
    us = 1e6
    print_table(f"map / unmap one {CHUNK // MiB} MiB chunk ({device}, best of {repeats}, {chunks} chunks each)",
                ["operation", "us per chunk", "vs fresh buffer"],
                [["map, cold (backend creates the chunk)", f"{cold * us:.1f}", f"{cold / buffer:.2f}x"],
                 ["map, warm (chunk from the pool's cache)", f"{warm * us:.1f}", f"{warm / buffer:.2f}x"],
                 ["unmap (chunk back to the cache)", f"{unmap * us:.1f}", f"{unmap / buffer:.2f}x"],
                 ["torch.empty(chunk).fill_ (reference)", f"{buffer * us:.1f}", "1.00x"]])

    v_cold = min(grow_virtual(device, total, warm=False) for _ in range(2))
    v_warm = min(grow_virtual(device, total, warm=True) for _ in range(2))
    copy = min(grow_copy(device, total) for _ in range(2 if args.quick else 1))  # the slow side: once at full size
    steps = total // STEP
    print_table(f"grow 0 -> {total // MiB} MiB in {steps} steps of {STEP // MiB} MiB, writing each step's bytes ({device})",
                ["method", "seconds", "ms per step", "copy baseline / this"],
                [["virtual tensor, cold chunks", f"{v_cold:.3f}", f"{v_cold / steps * 1e3:.2f}", f"{copy / v_cold:.2f}x"],
                 ["virtual tensor, cached chunks", f"{v_warm:.3f}", f"{v_warm / steps * 1e3:.2f}", f"{copy / v_warm:.2f}x"],
                 ["new buffer + copy (baseline)", f"{copy:.3f}", f"{copy / steps * 1e3:.2f}", "1.00x"]])

    write_json("pool", device, args, {
        "chunk_bytes": CHUNK,
        "map_unmap_us_per_chunk": {"map_cold": cold * us, "map_warm": warm * us, "unmap": unmap * us,
                                   "fresh_buffer_reference": buffer * us},
        "grow": {"total_bytes": total, "step_bytes": STEP, "steps": steps, "virtual_cold_s": v_cold,
                 "virtual_warm_s": v_warm, "copy_baseline_s": copy, "speedup_cold": copy / v_cold,
                 "speedup_warm": copy / v_warm},
    })


if __name__ == "__main__":
    main()
