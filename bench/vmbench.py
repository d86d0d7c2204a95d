"""Helpers shared by bench/pool.py and bench/elastic.py: command line, timing, table, JSON."""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import torch_ellm

RESULTS = Path(__file__).resolve().parent / "results"
MiB, GiB = 1 << 20, 1 << 30


def parse_args(doc):
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: the host backend; cuda: the cuda backend on GPU 0")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    return args


def backend_of(device):
    return "host" if device == "cpu" else "cuda"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    """Seconds fn takes, with the device's queued work finished before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_time(device, fn, repeats, setup=None):
    """Median over repeats of timed(fn), running setup() untimed before each."""
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        times.append(timed(device, fn))
    return statistics.median(times)


def pool(device, budget, host_budget=0, chunk=2 * MiB, host_tier="auto"):
    return torch_ellm.Pool(backend_of(device), budget_bytes=budget, host_budget_bytes=host_budget, chunk_bytes=chunk,
                           host_tier=host_tier)


def print_table(title, header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header] + rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def write_json(name, device, args, result):
    """bench/results/<name>_<backend>[_quick].json with the machine described."""
    info = {"backend": backend_of(device), "quick": args.quick, "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{backend_of(device)}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(info | result, indent=1) + "\n")
    print(f"\nwrote {path.relative_to(RESULTS.parent.parent)}")
