"""The caching allocator over the host backend, driven through its real C entry points (ctypes).

Every test configures the allocator itself (configure() needs no live allocation) and frees
what it allocated, so tests can run in any order.
"""
import ctypes
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_ellm
from torch_ellm import allocator

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
OK, OOM, INVALID = 0, 1, 2
CHUNK = 64 * KiB

lib = ctypes.CDLL(torch_ellm._C.__file__)
lib.torch_ellm_try_alloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
lib.torch_ellm_try_free.argtypes = [ctypes.c_void_p, ctypes.c_int]
lib.torch_ellm_last_error.restype = ctypes.c_char_p


def configure(budget):
    torch_ellm.configure("host", budget=budget, chunk="64KiB", granularity="64KiB")


def try_alloc(size, stream=0):
    """(code, address) from torch_ellm_try_alloc on device 0."""
    out = ctypes.c_void_p()
    code = lib.torch_ellm_try_alloc(size, 0, stream, ctypes.byref(out))
    return code, out.value


def alloc(size, stream=0):
    code, ptr = try_alloc(size, stream)
    assert code == OK, last_error()
    return ptr


def free(ptr):
    assert lib.torch_ellm_try_free(ptr, 0) == OK, last_error()


def last_error():
    return lib.torch_ellm_last_error().decode()


def stats():
    return torch_ellm.memory_stats(0)


def view(ptr, size):
    return torch.frombuffer((ctypes.c_char * size).from_address(ptr), dtype=torch.uint8)


def fill(ptr, size, byte):
    ctypes.memset(ptr, byte, size)


def intact(ptr, size, byte):
    """Whether the block still holds byte everywhere; large blocks are sampled with a prime
    stride (every 512-byte slot and every chunk is hit) to keep the test fast."""
    v = view(ptr, size)
    if size > MiB:
        v = torch.cat([v[::509], v[-1:]])
    return bool((v == byte).all())


def assert_all_returned():
    torch_ellm.empty_cache()
    s = stats()
    assert s["allocation.all.current"] == 0
    assert s["reserved_bytes.all.current"] == 0
    assert s["ellm.device_bytes"] == 0
    assert s["ellm.device_physical_bytes"] == 0


class Live:
    """The live blocks of all threads, checked for overlap as they are handed out."""

    def __init__(self):
        self.lock = threading.Lock()
        self.blocks = {}  # ptr -> (size, byte)

    def add(self, ptr, size, byte):
        with self.lock:
            for other, (other_size, _) in self.blocks.items():
                assert ptr + size <= other or other + other_size <= ptr, \
                    f"block {ptr:#x}+{size} overlaps live block {other:#x}+{other_size}"
            self.blocks[ptr] = (size, byte)

    def remove(self, ptr):
        # Before the free: once freed, another thread may get the address at once.
        with self.lock:
            size, byte = self.blocks.pop(ptr)
        assert intact(ptr, size, byte), f"block {ptr:#x}+{size} lost its contents"


# Mostly small (slab) requests, some medium, a few of hundreds of MiB.
small = st.integers(1, 16 * KiB)
medium = st.integers(16 * KiB + 1, 4 * MiB)
large = st.integers(4 * MiB + 1, 256 * MiB)
size = st.one_of(small, small, small, medium, medium, large)
# An op is an allocation of (size, stream), or a free of the index-th live block of the thread;
# allocations are twice as likely, so that live sets grow.
alloc_op = st.tuples(st.just("alloc"), size, st.integers(0, 2))
op = st.one_of(alloc_op, alloc_op, st.tuples(st.just("free"), st.integers(0, 1000), st.just(0)))
# Live bytes per thread: three threads stay inside the budget (1.5 GiB) even with every block
# rounded up to a chunk, while the blocks they cache on three streams do not, so retries happen.
LIVE_CAP = 400 * MiB


def run_thread(ops, thread_index, live, kept, errors):
    try:
        mine = []
        live_bytes = 0
        for i, (kind, arg, stream) in enumerate(ops):
            if kind == "alloc" and live_bytes + arg <= LIVE_CAP:
                ptr = alloc(arg, stream)
                byte = 1 + (thread_index * 97 + i) % 255
                fill(ptr, arg, byte)
                live.add(ptr, arg, byte)
                mine.append((ptr, arg))
                live_bytes += arg
            elif mine:
                ptr, n = mine.pop(arg % len(mine))
                live.remove(ptr)
                free(ptr)
                live_bytes -= n
        kept.extend(mine)
    except BaseException as e:  # reported by the main thread
        errors.append(e)


@pytest.fixture(scope="module")
def random_pool():
    configure("1536MiB")
    yield
    assert_all_returned()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(programs=st.lists(st.lists(op, max_size=40), min_size=3, max_size=3))
def test_random_threads(random_pool, programs):
    live, kept, errors = Live(), [], []
    threads = [threading.Thread(target=run_thread, args=(ops, i, live, kept, errors))
               for i, ops in enumerate(programs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors[0]
        s = stats()
        assert s["allocation.all.current"] == len(live.blocks)
        assert s["allocated_bytes.all.current"] == sum((n + 511) // 512 * 512 for n, _ in live.blocks.values())
        assert s["requested_bytes.all.current"] == sum(n for n, _ in live.blocks.values())
        assert s["reserved_bytes.all.current"] >= s["allocated_bytes.all.current"]
    finally:
        # Blocks are freed here by another thread than the one that made them.
        for ptr in list(live.blocks):
            live.remove(ptr)
            free(ptr)
    assert_all_returned()


def test_out_of_memory_is_reported_and_recovers():
    configure("4MiB")
    held = alloc(1 * MiB)
    code, ptr = try_alloc(8 * MiB)
    assert (code, ptr) == (OOM, None)
    message = last_error()
    assert "tried to allocate 8.00 MiB" in message
    assert "1.00 MiB in use" in message
    assert "budget 4.00 MiB" in message
    assert stats()["num_ooms"] == 1
    # Still usable: the rest of the budget can be had, and nothing leaked.
    more = alloc(3 * MiB)
    fill(more, 3 * MiB, 5)
    assert intact(more, 3 * MiB, 5)
    assert stats()["allocation.all.current"] == 2
    free(more)
    free(held)
    assert_all_returned()


def test_small_blocks_are_512_byte_aligned():
    """As PyTorch's blocks are: vectorized kernels may pick their path by alignment."""
    configure("4MiB")
    ptrs = [alloc(size) for size in (1, 600, 700, 768, 900, 1500, 3000) for _ in range(3)]
    assert all(ptr % 512 == 0 for ptr in ptrs)
    for ptr in ptrs:
        free(ptr)
    assert_all_returned()


def test_mem_pool_entry_point_returns_null_on_out_of_memory():
    """mem_pool()'s alloc: PyTorch's own caching allocator takes NULL for out of memory (frees its
    cache, retries, then raises torch.OutOfMemoryError), so it must not throw there."""
    configure("4MiB")
    alloc_or_null = lib.torch_ellm_alloc_or_null
    alloc_or_null.argtypes, alloc_or_null.restype = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    assert alloc_or_null(8 * MiB, 0, None) is None
    assert "tried to allocate 8.00 MiB" in last_error()
    ptr = alloc_or_null(1 * MiB, 0, None)
    assert ptr
    fill(ptr, 1 * MiB, 3)
    assert intact(ptr, 1 * MiB, 3)
    free(ptr)
    assert_all_returned()


def assert_counters(retries, reserved):
    s = stats()
    assert (s["num_alloc_retries"], s["num_ooms"], s["reserved_bytes.all.current"]) == (retries, 0, reserved)


def test_retry_frees_cached_blocks():
    configure("1MiB")  # 16 chunks of 64 KiB
    # Ten size classes, a slab of pages each in a few shared chunks, all freed: cached, still mapped.
    for size in (512, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384):
        free(alloc(size))
    cached = stats()["reserved_bytes.all.current"] // CHUNK
    assert 0 < cached < 10
    # One chunk more than is free beside the cached slabs.
    ptr = alloc((16 - cached + 1) * CHUNK)
    assert_counters(retries=1, reserved=(16 - cached + 1) * CHUNK)
    free(ptr)
    assert_all_returned()


def test_empty_slabs_give_their_pages_before_anyone_shrinks():
    configure("64KiB")  # one chunk of 32 pages of 2 KiB
    asked = []
    consumer = torch_ellm.pool(0).add_consumer("other", lambda want: asked.append(want) or 0)
    held = alloc(512)
    free(alloc(12 * KiB))  # 24 pages
    free(alloc(3 * KiB))   # 6 pages: 31 of 32 taken, two slabs empty
    ptr = alloc(1 * KiB)   # 2 pages: only the empty slabs' pages can hold it
    s = stats()
    assert (s["num_ooms"], s["num_alloc_retries"], s["reserved_bytes.all.current"]) == (0, 0, CHUNK)
    assert not asked
    torch_ellm.pool(0).remove_consumer(consumer)
    free(ptr)
    free(held)
    assert_all_returned()


def test_size_classes_share_chunks_by_pages():
    torch_ellm.configure("host", budget="64MiB", chunk="2MiB", granularity="2MiB")
    live = Live()
    sizes = [512 * 2 ** k for k in range(8)] + [1536 * 2 ** k for k in range(6)]  # 14 classes, 512 B to 64 KiB
    for i, size in enumerate(sizes):
        ptr = alloc(size)
        fill(ptr, size, i)
        live.add(ptr, size, i)
    # A 64 KiB page holds four 16 KiB slots, 64 KiB blocks take four pages: one chunk in all.
    assert stats()["reserved_bytes.all.current"] == 2 * MiB
    for ptr in list(live.blocks):
        live.remove(ptr)
        free(ptr)
    assert_all_returned()


@pytest.mark.parametrize("stream", [0, 1], ids=["same stream: resized in place", "other stream: chunks recycled"])
def test_large_miss_reuses_cached_chunks_without_retry(stream):
    configure("4MiB")
    cached = alloc(3 * MiB)
    free(cached)  # cached, still mapped, on stream 0
    # 2 MiB is too small to reuse the 3 MiB block as it is, and does not fit beside it.
    ptr = alloc(2 * MiB, stream=stream)
    assert_counters(retries=0, reserved=2 * MiB)
    if stream == 0:
        assert ptr == cached  # (a recycled range may get the old address back too, so no check for 1)
    free(ptr)
    assert_all_returned()


def test_cached_large_block_grows_in_place():
    configure("64MiB")
    small = alloc(1 * MiB)
    free(small)
    torch_ellm.reset_peak_memory_stats(0)
    # A request 8x larger than any cached block: the cached range grows, mapping the difference,
    # rather than a new range beside it (reserved would peak at 9 MiB).
    big = alloc(8 * MiB)
    assert big == small
    assert stats()["reserved_bytes.all.peak"] == 8 * MiB
    free(big)
    assert_all_returned()


def test_miss_unmaps_the_stalest_cached_blocks_when_the_cache_dwarfs_what_is_live():
    configure("64MiB")
    stale, other, recent = alloc(4 * MiB), alloc(4 * MiB), alloc(1 * MiB)
    for ptr in (stale, other, recent):
        free(ptr)
    # Nothing is live and 9 MiB is cached. 2 MiB grows the closest block (1 MiB) by 1 MiB; that
    # 1 MiB comes from the block freed first, so reserved stays flat instead of growing.
    ptr = alloc(2 * MiB)
    assert ptr == recent
    assert_counters(retries=0, reserved=6 * MiB)
    again = alloc(4 * MiB)
    assert again == other  # the one left cached, reused as it is
    free(ptr)
    free(again)
    assert_all_returned()


@pytest.mark.parametrize("other, asked", [(7 * MiB, 4 * MiB), (1 * MiB, 6 * MiB)],
                         ids=["cache holds more than the miss", "cache holds less than the miss"])
def test_miss_past_the_high_water_mark_first_unmaps_the_blocks_it_passes_over(other, asked):
    """A miss grows the closest cached block in place. Where that would take reserved memory past its
    high-water mark, the other cached blocks give their chunks first, however few: reserved then
    peaks where allocated did (the GPU generate run's prefill did this, 1.026 before)."""
    configure("64MiB")
    live = alloc(4 * MiB)  # so that the cache does not dwarf what is live, which would unmap it anyway
    grown, passed_over = alloc(2 * MiB), alloc(other)
    free(grown)
    free(passed_over)
    ptr = alloc(asked)
    assert ptr == grown
    s = stats()
    assert s["reserved_bytes.all.peak"] == s["allocated_bytes.all.peak"] == 4 * MiB + max(2 * MiB + other, asked)
    assert s["reserved_bytes.all.current"] == 4 * MiB + asked
    free(ptr)
    free(live)
    assert_all_returned()


def test_a_cached_block_a_few_chunks_larger_is_handed_out_whole():
    """A decode step of Hugging Face generate, as recorded: each KV torch.cat allocates a 5-chunk block
    before the old one is freed, and the logits, 2 chunks, come between. Shrinking a cached KV block for
    the logits and growing one back for the next cat mapped and unmapped 3 chunks a step (on the H100,
    about 0.35 ms); a block up to four chunks larger is now handed out whole."""
    configure("64MiB")
    kv = alloc(5 * CHUNK - 100)
    pool_events = []
    for step in range(12):
        before = len(torch_ellm.pool(0).events())
        logits = alloc(2 * CHUNK - 100)
        free(logits)
        grown = alloc(5 * CHUNK - 100 + step)
        free(kv)
        kv = grown
        pool_events.append(len(torch_ellm.pool(0).events()) - before)
    assert pool_events[2:] == [0] * 10, pool_events  # after the first steps fill the cache: no driver call
    free(kv)
    assert_all_returned()


@pytest.mark.parametrize("size", [1000, 3 * MiB], ids=["slab", "large"])
def test_cached_block_is_reused_on_its_stream_only(size):
    configure("64MiB")
    first = alloc(size, stream=1)
    free(first)
    pool_events = len(torch_ellm.pool(0).events())
    again = alloc(size, stream=1)
    assert again == first
    assert len(torch_ellm.pool(0).events()) == pool_events  # straight from the cache
    free(again)
    other = alloc(size, stream=2)
    if size > MiB:
        # Never the cached block as it is: fresh chunks, or the cached block's chunks after an
        # unmap (which synchronizes), and either way the pool sees it.
        assert len(torch_ellm.pool(0).events()) > pool_events
    else:
        assert other != first  # another slab: pages of its own, in the same chunk or another
    free(other)
    assert_all_returned()


def test_tag_counts_pool_bytes():
    configure("64MiB")
    before = stats()
    with torch_ellm.tag("weights"):
        ptr = alloc(1 * MiB)
    after = stats()
    assert after["ellm.tag.weights.device_bytes"] - before["ellm.tag.weights.device_bytes"] == 1 * MiB
    assert after["ellm.tag.activations.device_bytes"] == before["ellm.tag.activations.device_bytes"]
    default = alloc(1 * MiB)  # outside the block: activations again
    assert stats()["ellm.tag.activations.device_bytes"] - before["ellm.tag.activations.device_bytes"] == 1 * MiB
    free(ptr)
    free(default)
    assert_all_returned()
    assert stats()["ellm.tag.weights.device_bytes"] == 0


def test_unknown_tag():
    with pytest.raises(ValueError, match="unknown tag 'scratch'"):
        with torch_ellm.tag("scratch"):
            pass


def test_bad_arguments():
    configure("64MiB")
    assert try_alloc(-1) == (INVALID, None)
    assert "negative" in last_error()
    held = alloc(100)
    assert lib.torch_ellm_try_free(held + 8, 0) == INVALID
    assert "did not hand out" in last_error()
    assert lib.torch_ellm_try_free(held, 7) == INVALID  # a device with no allocator
    free(held)
    assert lib.torch_ellm_try_free(held, 0) == INVALID  # double free
    assert_all_returned()


def test_configure_with_live_allocations_raises():
    configure("64MiB")
    held = alloc(100)
    with pytest.raises(ValueError, match="live allocations"):
        configure("128MiB")
    assert stats()["ellm.budget_bytes"] == 64 * MiB
    free(held)
    configure("128MiB")
    assert stats()["ellm.budget_bytes"] == 128 * MiB


@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("budget:70GiB,host_budget:32GiB,chunk:2MiB", {"budget": "70GiB", "host_budget": "32GiB", "chunk": "2MiB"}),
    (" fraction: 0.9 , ", {"fraction": "0.9"}),
])
def test_parse_conf(text, expected):
    assert allocator.parse_conf(text) == expected


@pytest.mark.parametrize("text", ["budget=70GiB", "budjet:1GiB", "budget"])
def test_parse_conf_rejects(text):
    with pytest.raises(ValueError, match="TORCH_ELLM_CONF: cannot read"):
        allocator.parse_conf(text)


def test_conf_from_environment(monkeypatch):
    monkeypatch.setenv("TORCH_ELLM_CONF", "budget:8MiB,chunk:128KiB")
    torch_ellm.configure("host", granularity="64KiB")
    s = stats()
    assert (s["ellm.budget_bytes"], s["ellm.chunk_bytes"]) == (8 * MiB, 128 * KiB)
    torch_ellm.configure("host", budget="16MiB", granularity="64KiB")  # a keyword wins
    assert stats()["ellm.budget_bytes"] == 16 * MiB
    for bad, match in [("budget:lots", "budget"), ("fraction:1.5", "fraction")]:
        monkeypatch.setenv("TORCH_ELLM_CONF", bad)
        with pytest.raises(ValueError, match=match):
            torch_ellm.configure("host", granularity="64KiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_enable_needs_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        torch_ellm.enable()
    assert not torch_ellm.is_enabled()


def test_oom_shim_raises_torch_out_of_memory():
    # Compiled with torch.utils.cpp_extension the first time (about 40 s), then cached.
    from torch_ellm import shim

    with pytest.raises(torch.OutOfMemoryError, match="x"):
        shim.load().raise_oom("x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the shim's CUDA hooks may build")
def test_shim_without_cuda_hooks_still_makes_oom_a_torch_error():
    """Where the CUDA shim cannot be built, enable() falls back to the Python API; the CPU shim then
    still installs the thrower, so the warning must not promise a plain RuntimeError."""
    code = ("import warnings\nfrom torch_ellm import shim\nwith warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n    ok = shim.install_cuda_allocator()\n"
            "print(ok, '|', ' '.join(str(x.message) for x in w))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ok, message = done.stdout.strip().split(" | ", 1)
    assert ok == "False" and "could not build the PyTorch shim with CUDA hooks" in message
    assert "out of memory will raise RuntimeError" not in message
