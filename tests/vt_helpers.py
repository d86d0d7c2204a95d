"""Helpers shared by test_pool.py and test_elastic.py (issues 2 and 4, host backend).

Mirror: a VirtualTensor plus a torch copy of every byte written into it, so a test can check the
memory against the copy after anything the pool did. run_rounds: per-thread op lists played in
lockstep, with a consistency check run alone between rounds and a monitor polling stats meanwhile.
"""
import subprocess
import sys
import threading

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

import torch_ellm

KiB = 1 << 10
THREADS, SLOTS, MAX_CHUNKS = 3, 2, 12

# Thread interleavings are not replayable, so shrinking would chase noise: report the example as found.
THREADED = settings(max_examples=100, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow])


class Mirror:
    """A virtual tensor and the bytes we expect in [0, nbytes). Every access to its memory goes
    through `with vt.pinned()`: the documented contract that keeps the pool from moving it meanwhile."""

    def __init__(self, pool, max_bytes, tag="other"):
        self.vt = pool.virtual_tensor(max_bytes, tag=tag)
        self.ptr = self.vt.data_ptr()
        self.expected = torch.empty(0, dtype=torch.uint8)

    @property
    def nbytes(self):
        return self.expected.numel()

    def resize(self, nbytes, gen):
        """Resize and fill any newly exposed bytes with random data. On failure (OOM) nothing changes."""
        old, chunk = self.nbytes, self.vt.pool.chunk_bytes
        if nbytes > old and old % chunk and self.vt.pool.host_tier == "parked":
            # The new bytes of the last chunk must be written: bring it back first, or fail as a resize would.
            self.vt.prefetch(old - old % chunk, old)
        self.vt.resize(nbytes)
        kept = self.expected[: min(old, nbytes)]
        self.expected = torch.cat([kept, torch.empty(max(0, nbytes - old), dtype=torch.uint8)])
        if nbytes > old:
            self.write(old, nbytes, gen)

    def _spans(self, start, end):
        """[start, end) cut at chunk boundaries into (begin, stop, parked) pieces, merged while alike.
        Parked chunks (pool.host_tier 'parked') are unmapped: no view may touch them."""
        chunk, parked_pool = self.vt.pool.chunk_bytes, self.vt.pool.host_tier == "parked"
        where = self.vt.chunk_locations()
        spans, pos = [], start
        while pos < end:
            stop = min(pos - pos % chunk + chunk, end)
            parked = parked_pool and where[pos // chunk] == "host"
            if spans and spans[-1][2] == parked:
                spans[-1] = (spans[-1][0], stop, parked)
            else:
                spans.append((pos, stop, parked))
            pos = stop
        return spans

    def write(self, start, end, gen):
        """Random bytes into [start, end), through torch views of the virtual tensor. Parked chunks are
        prefetched first; any still parked (no device room) are left as they were."""
        data = torch.randint(0, 256, (end - start,), dtype=torch.uint8, generator=gen)
        with self.vt.pinned():
            if self.vt.pool.host_tier == "parked":
                try:
                    self.vt.prefetch(start - start % self.vt.pool.chunk_bytes, end)
                except torch_ellm.OutOfMemoryError:
                    pass
            for begin, stop, parked in self._spans(start, end):
                if not parked:
                    view = self.vt.as_tensor(stop - begin, torch.uint8, offset=begin)
                    view[:] = data[begin - start:stop - start]
                    del view  # a live view would block a later shrink, park or release
                    self.expected[begin:stop] = data[begin - start:stop - start]

    def check(self):
        """Bytes, address and mapping agree with what we expect; parked chunks are unmapped."""
        assert self.vt.data_ptr() == self.ptr, "a live virtual tensor moved"
        assert self.vt.nbytes == self.nbytes
        chunk = self.vt.pool.chunk_bytes
        assert self.vt.mapped_bytes == -(-self.nbytes // chunk) * chunk
        with self.vt.pinned():
            for begin, stop, parked in self._spans(0, self.nbytes):
                if parked:
                    assert_unmapped(self.ptr + begin, self.ptr + stop)
                    continue
                view = self.vt.as_tensor(stop - begin, torch.uint8, offset=begin)
                bad = (view != self.expected[begin:stop]).nonzero()
                del view
                assert bad.numel() == 0, f"{bad.numel()} bytes changed, first at offset {begin + int(bad[0])}"

    def release(self):
        self.vt.release()


def assert_unmapped(start, end):
    """No access is allowed anywhere in [start, end) (Linux: every mapping there is PROT_NONE)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo < end and start < hi:
                assert line.split()[1].startswith("---"), f"[{start:#x}, {end:#x}) is accessible: {line.strip()}"


def check_no_overlap(mirrors):
    """Reserved ranges [ptr, ptr + max_bytes) of live tensors are disjoint, so their mapped prefixes are."""
    ranges = sorted((m.ptr, m.ptr + m.vt.max_bytes, m.ptr + m.vt.mapped_bytes) for m in mirrors)
    for (start, end, mapped_end), (next_start, _, _) in zip(ranges, ranges[1:]):
        assert start <= mapped_end <= end
        assert end <= next_start, f"ranges overlap: [{start:#x}, {end:#x}) and one starting at {next_start:#x}"


def check_totals(pool, mirrors):
    """Pool-wide counters equal the sums over live tensors (only valid while nothing else runs)."""
    s = pool.stats()
    mapped = sum(m.vt.mapped_bytes for m in mirrors)
    on_host = sum(m.vt.host_bytes for m in mirrors)
    assert s["mapped_device_bytes"] + s["mapped_host_bytes"] == mapped - (on_host if pool.host_tier == "parked" else 0)
    assert s["borrowed_bytes"] == on_host
    assert s["mapped_host_bytes"] == (0 if pool.host_tier == "parked" else on_host)
    assert s["mapped_device_bytes"] == s["device_bytes"] == mapped - on_host
    assert s["reserved_address_bytes"] == sum(m.vt.max_bytes for m in mirrors)
    assert s["virtual_tensors"] == len(mirrors)
    by_tag = s["bytes_by_tag"]
    assert sum(t["device_bytes"] for t in by_tag.values()) == s["device_bytes"]
    assert sum(t["host_bytes"] for t in by_tag.values()) == s["borrowed_bytes"]
    for tag, t in by_tag.items():
        assert t["device_bytes"] + t["host_bytes"] == sum(m.vt.mapped_bytes for m in mirrors if m.vt.tag == tag)
    check_limits(s)


def limit_violations(s):
    """What in one stats snapshot breaks a budget (a snapshot is taken under the pool's lock)."""
    out = []
    if s["device_physical_bytes"] > s["budget_bytes"]:
        out.append(f"device physical {s['device_physical_bytes']} > budget {s['budget_bytes']}")
    if s["device_bytes"] > s["budget_bytes"]:
        out.append(f"device in use {s['device_bytes']} > budget {s['budget_bytes']}")
    if s["borrowed_bytes"] > s["host_budget_bytes"]:
        out.append(f"borrowed {s['borrowed_bytes']} > host budget {s['host_budget_bytes']}")
    return out


def check_limits(s):
    assert not limit_violations(s), limit_violations(s)


def check_empty(pool):
    """After every tensor is released nothing is mapped, in use or reserved; trim empties the caches."""
    s = pool.stats()
    for key in ("device_bytes", "borrowed_bytes", "mapped_device_bytes", "mapped_host_bytes",
                "reserved_address_bytes", "virtual_tensors"):
        assert s[key] == 0, (key, s[key])
    assert all(v == 0 for t in s["bytes_by_tag"].values() for v in t.values()), s["bytes_by_tag"]
    pool.trim()
    s = pool.stats()
    assert s["device_physical_bytes"] == s["device_cached_bytes"] == s["host_cached_bytes"] == 0


class Monitor:
    """Polls pool.stats() from its own thread while work runs and keeps every budget violation seen."""

    def __init__(self, pool):
        self.pool, self.violations = pool, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.0002):  # a short pause leaves the GIL to the workers
            self.violations += limit_violations(self.pool.stats())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_rounds(rounds, step, check):
    """rounds[t] is thread t's op list (all the same length). Round r runs step(t, op) in every
    thread at once; then check() runs alone (as the barrier action) before round r + 1.
    The first error in any thread or check is re-raised here."""
    barrier = threading.Barrier(len(rounds), action=check)
    errors = []

    def worker(t):
        try:
            for op in rounds[t]:
                step(t, op)
                barrier.wait()
        except threading.BrokenBarrierError:
            pass  # another thread failed; its error is the one to report
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(rounds))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def run_isolated(code):
    """Run code in a fresh interpreter (a crash there must not take pytest down); returns the process."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- random op sequences over threads


def thread_rounds(kinds, max_rounds=8):
    """THREADS equal-length lists of ops (kind, slot, a, b); a and b are per-mille fractions that
    steps turn into sizes, offsets or budgets."""
    op = st.tuples(st.sampled_from(kinds), st.integers(0, SLOTS - 1), st.integers(0, 1000), st.integers(0, 1000))

    @st.composite
    def rounds(draw):
        n = draw(st.integers(2, max_rounds))
        return [draw(st.lists(op, min_size=n, max_size=n)) for _ in range(THREADS)]

    return rounds()


def play(pool, rounds, step_op):
    """Run rounds with step_op(thread, slots, op) while a monitor polls the budgets; between rounds
    check every live tensor's bytes, address and mapping, disjoint ranges and pool totals. At the
    end release everything and check the pool is empty."""
    slots = [[None] * SLOTS for _ in range(THREADS)]

    def live():
        return [m for row in slots for m in row if m is not None]

    def check():
        mirrors = live()
        for m in mirrors:
            m.check()
        check_no_overlap(mirrors)
        check_totals(pool, mirrors)

    with Monitor(pool) as monitor:
        run_rounds(rounds, lambda t, op: step_op(t, slots[t], op), check)
    assert not monitor.violations, monitor.violations[:5]
    if pool.host_tier == "parked":  # bring every parked byte back to check it
        pool.set_budget(pool.budget_bytes + pool.host_budget_bytes)
        for m in live():
            m.vt.prefetch()
    for m in live():
        m.check()
        m.release()
    check_empty(pool)


def create_or_step(pool, row, op, gen, tags):
    """Create/resize/write/release ops. An op on an empty slot creates a tensor there (any size,
    unaligned too) whatever its kind, and resizes it to a fraction b of that."""
    kind, slot, a, b = op
    if row[slot] is None:
        row[slot] = Mirror(pool, 1 + a * MAX_CHUNKS * pool.chunk_bytes // 1000, tag=tags[b % len(tags)])
        kind = "resize"
    m = row[slot]
    if kind == "release":
        m.release()
        row[slot] = None
    elif kind == "write" and m.nbytes:
        start = a * m.nbytes // 1001
        m.write(start, max(start + 1, b * m.nbytes // 1000), gen)
    elif kind == "resize":
        resize_or_oom(m, b * m.vt.max_bytes // 1000, gen)


def resize_or_oom(m, nbytes, gen):
    """Resize; an OutOfMemoryError must leave the tensor as it was (its bytes are checked each round)."""
    before = (m.vt.nbytes, m.vt.mapped_bytes)
    try:
        m.resize(nbytes, gen)
    except torch_ellm.OutOfMemoryError:
        assert (m.vt.nbytes, m.vt.mapped_bytes) == before
