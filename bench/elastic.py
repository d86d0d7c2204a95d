"""Benchmark of elastic memory (issue 4): deflate/inflate throughput and what a request waits.

- deflate / inflate: a kv virtual tensor of 512 MiB (128 MiB with --quick), 2 MiB chunks, moved to
  host memory and back at the same address, explicitly (offload / prefetch, on the mapped host tier
  and on the parked fallback, which copies out and unmaps) and by the pool
  (set_budget(0) borrows, return_borrowed gives back): GB/s and microseconds per chunk, against a
  plain copy of the same bytes in the same run (host: torch copy_ between two CPU buffers, i.e.
  memcpy; cuda: device-to-host and host-to-device copies with pinned memory).
- host buffer: seconds to get page-locked host memory of that size (the engine's swap space) new (after
  trim(): mmap + populate on host, cuMemAllocHost on cuda) and from the pool's cache of released buffers.
- request wait: seconds until a 1 GiB request (256 MiB with --quick) is mapped when the memory is
  free (cold: backend creates chunks; cached), when a consumer must shrink first, and when the pool
  must borrow host memory from a live kv tensor first.

usage: python bench/elastic.py [--device cpu|cuda] [--quick]; writes bench/results/elastic_<backend>.json
"""
import torch

from vmbench import GiB, MiB, median_time, parse_args, pool, print_table, timed, write_json

CHUNK = 2 * MiB


def filled(p, nbytes, tag="kv"):
    vt = p.virtual_tensor(nbytes, tag=tag)
    vt.resize(nbytes)
    view = vt.as_tensor(nbytes, torch.uint8)
    view.fill_(7)
    del view
    return vt


def offload_prefetch(p, size, repeats, label=""):
    """Median seconds of vt.offload() and vt.prefetch() of a `size` kv tensor in pool p."""
    vt = filled(p, size)
    device = "cpu" if p.backend == "host" else "cuda"
    out = {f"offload{label}": median_time(device, vt.offload, repeats, setup=lambda: vt.prefetch()),
           f"prefetch{label}": median_time(device, vt.prefetch, repeats, setup=lambda: vt.offload())}
    vt.release()
    return out


def moves(device, size, repeats):
    """Median seconds for: offload, prefetch (mapped host tier where the backend has one, then the
    parked fallback), borrow via set_budget(0), return_borrowed."""
    p = pool(device, budget=size, host_budget=size)
    out = offload_prefetch(p, size, repeats, f" ({p.host_tier})")
    if p.host_tier == "mapped":
        out.update(offload_prefetch(pool(device, budget=size, host_budget=size, host_tier="parked"), size, repeats,
                                    " (parked)"))
    vt = filled(p, size)

    def restore():
        p.set_budget(size)
        p.return_borrowed()

    out["borrow (set_budget)"] = median_time(device, lambda: p.set_budget(0), repeats, setup=restore)
    out["return_borrowed"] = median_time(device, p.return_borrowed, repeats, setup=lambda: (p.set_budget(0), p.set_budget(size)))
    restore()
    vt.release()
    return out


def copies(device, size, repeats):
    """Median seconds of plain copies of the same bytes: {name: seconds}."""
    src = torch.full((size,), 7, dtype=torch.uint8, device=device)
    if device == "cpu":
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in first
        return {"memcpy (torch copy_)": median_time(device, lambda: dst.copy_(src), repeats)}
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    return {"device -> host copy (pinned)": median_time(device, lambda: host.copy_(src), repeats),
            "host -> device copy (pinned)": median_time(device, lambda: src.copy_(host), repeats)}


def host_buffers(device, size, repeats):
    """Median seconds to get a `size` host buffer: {"new": ..., "cached": ...}."""
    p = pool(device, size, host_budget=size)
    out = {"new": median_time(device, lambda: p.host_buffer(size).release(), repeats, setup=p.trim),
           "cached": median_time(device, lambda: p.host_buffer(size).release(), repeats)}
    p.trim()
    return out


def request_waits(device, size):
    """Seconds a `size` request waits to be mapped, by what the pool must do first."""
    out = {}
    p = pool(device, budget=size)
    vt = p.virtual_tensor(size)
    out["free memory, cold chunks"] = timed(device, lambda: vt.resize(size))
    vt.resize(0)
    out["free memory, cached chunks"] = timed(device, lambda: vt.resize(size))
    vt.release()
    del p

    p = pool(device, budget=size)
    other = filled(p, size, tag="other")
    p.add_consumer("bench", lambda want: shrink_by(other, want))
    vt = p.virtual_tensor(size)
    out["consumer shrinks first"] = timed(device, lambda: vt.resize(size))
    vt.release()
    other.release()
    del p

    p = pool(device, budget=size, host_budget=size)
    kv = filled(p, size)
    vt = p.virtual_tensor(size, tag="activations")
    out["borrows host memory first"] = timed(device, lambda: vt.resize(size))
    vt.release()
    kv.release()
    return out


def shrink_by(vt, want):
    keep = max(0, vt.mapped_bytes - want)
    freed = vt.mapped_bytes - keep
    vt.resize(keep)
    return freed


def main():
    args = parse_args(__doc__)
    device = args.device
    size = 128 * MiB if args.quick else 512 * MiB
    request = 256 * MiB if args.quick else GiB
    repeats = 3 if args.quick else 5
    chunks = size // CHUNK

    moved = moves(device, size, repeats)
    plain = copies(device, size, repeats)
    reference = min(plain.values())
    rows = [[name, f"{size / s / 1e9:.2f}", f"{s / chunks * 1e6:.1f}", f"{s / reference:.2f}x"]
            for name, s in list(moved.items()) + list(plain.items())]
    print_table(f"moving {size // MiB} MiB in {CHUNK // MiB} MiB chunks ({device}, median of {repeats})",
                ["operation", "GB/s", "us per chunk", "time vs fastest copy"], rows)

    buffers = host_buffers(device, size, repeats)
    print_table(f"a {size // MiB} MiB host buffer ({device}, median of {repeats})", ["source", "ms", "vs new"],
                [[name, f"{s * 1e3:.3f}", f"{s / buffers['new']:.5f}x"] for name, s in buffers.items()])

    waits = request_waits(device, request)
    free = waits["free memory, cold chunks"]
    print_table(f"a {request // MiB} MiB request: seconds until mapped ({device})",
                ["situation", "seconds", "vs free (cold)"],
                [[name, f"{s:.4f}", f"{s / free:.2f}x"] for name, s in waits.items()])

    write_json("elastic", device, args, {
        "chunk_bytes": CHUNK, "moved_bytes": size, "repeats": repeats,
        "move_seconds": moved, "copy_seconds": plain,
        "move_gb_per_s": {k: size / s / 1e9 for k, s in moved.items()},
        "copy_gb_per_s": {k: size / s / 1e9 for k, s in plain.items()},
        "host_buffer_seconds": buffers,
        "request_bytes": request, "request_wait_seconds": waits,
    })


if __name__ == "__main__":
    main()
