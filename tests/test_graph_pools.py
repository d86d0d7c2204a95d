"""CUDA graph private pools in the caching allocator, driven through the C entry points PyTorch's
hooks call (beginAllocateToPool, endAllocateToPool, releasePool), over the host backend. A capture
is stood for by its filter: here, the allocations on stream 7 are the graph's."""
import ctypes

import pytest

import torch_ellm
from test_allocator import INVALID, OK, OOM, KiB, MiB, alloc, assert_all_returned, configure, free, last_error, lib, \
    stats, try_alloc

FILTER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)  # (context, stream) -> claimed
lib.torch_ellm_begin_allocate_to_pool.argtypes = [ctypes.c_int, ctypes.c_uint64, FILTER, ctypes.c_void_p]
lib.torch_ellm_end_allocate_to_pool.argtypes = [ctypes.c_int, ctypes.c_uint64]
lib.torch_ellm_release_pool.argtypes = [ctypes.c_int, ctypes.c_uint64]
lib.torch_ellm_record_stream.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]

CAPTURED = 7  # the stream the graph is captured on
on_captured_stream = FILTER(lambda context, stream: int(stream == CAPTURED))
OTHER_CAPTURED = 8  # another graph's, captured meanwhile
on_other_stream = FILTER(lambda context, stream: int(stream == OTHER_CAPTURED))
# A slab block (the small limit is a quarter of the 64 KiB chunk), a large block of a few chunks,
# and one of many.
SIZES = [4 * KiB, 300 * KiB, 3 * MiB]
# Captures underway and pools begun, so that a failing test leaves no capture or pool to the next.
capturing, uses = [], []


def begin(pool, claims=on_captured_stream):
    assert lib.torch_ellm_begin_allocate_to_pool(0, pool, claims, None) == OK, last_error()
    capturing.append(pool)
    uses.append(pool)


def end(pool):
    assert lib.torch_ellm_end_allocate_to_pool(0, pool) == OK, last_error()
    capturing.remove(pool)


def release(pool):
    assert lib.torch_ellm_release_pool(0, pool) == OK, last_error()
    if pool in uses:
        uses.remove(pool)


@pytest.fixture(autouse=True)
def end_captures_and_release_pools():
    yield
    while capturing:
        lib.torch_ellm_end_allocate_to_pool(0, capturing.pop())
    while uses:
        lib.torch_ellm_release_pool(0, uses.pop())


@pytest.mark.parametrize("size", SIZES)
def test_a_graph_block_is_reused_by_its_pool_only(size):
    configure("64MiB")
    begin(1)
    graph = alloc(size, CAPTURED)
    free(graph)  # an intermediate of the graph: the same capture may reuse it
    assert alloc(size, CAPTURED) == graph
    free(graph)
    end(1)
    eager = alloc(size, CAPTURED)  # after the capture, on the same stream: the graph's replays write there
    assert eager != graph
    begin(1)  # a second graph captured into the same pool gets it back
    assert alloc(size, CAPTURED) == graph
    free(graph)
    end(1)
    free(eager)
    release(1)  # one release for each graph
    release(1)
    assert_all_returned()


@pytest.mark.parametrize("size", SIZES)
def test_allocations_the_filter_does_not_claim_stay_in_the_shared_cache(size):
    configure("64MiB")
    begin(1)
    other = alloc(size, stream=8)
    free(other)
    end(1)
    assert alloc(size, stream=8) == other
    free(other)
    release(1)
    assert_all_returned()


@pytest.mark.parametrize("size", SIZES)
def test_empty_cache_keeps_a_graph_pool_until_it_is_released(size):
    configure("64MiB")
    begin(1)
    free(alloc(size, CAPTURED))
    end(1)
    torch_ellm.empty_cache()
    assert stats()["reserved_bytes.all.current"] >= size  # still the graph's
    assert stats()["ellm.graph_pools"] == 1 and stats()["ellm.graph_pool_cached_bytes"] >= size
    assert "Free in CUDA graph pools (1)" in torch_ellm.memory_summary(0)
    release(1)
    assert stats()["ellm.graph_pools"] == 0 and stats()["ellm.graph_pool_cached_bytes"] == 0
    assert_all_returned()


@pytest.mark.parametrize("size", SIZES)
def test_a_block_live_when_its_graph_is_released_joins_the_shared_cache_when_freed(size):
    configure("64MiB")
    begin(1)
    output = alloc(size, CAPTURED)  # a graph output the program still holds
    end(1)
    release(1)
    free(output)
    assert alloc(size, CAPTURED) == output
    free(output)
    assert_all_returned()


def test_nothing_is_unmapped_while_capturing():
    """Unmapping synchronizes, which a capture forbids: a capture that needs the shared cache's chunks
    gets out of memory instead; once it has ended, the same request recycles them."""
    configure("1MiB")  # 16 chunks
    free(alloc(768 * KiB, stream=0))  # 12 chunks cached
    begin(1)
    code, _ = try_alloc(768 * KiB, CAPTURED)
    assert code == OOM, last_error()
    assert stats()["reserved_bytes.all.current"] == 768 * KiB  # the cached block is still there
    end(1)
    free(alloc(768 * KiB, CAPTURED))
    release(1)
    assert_all_returned()


@pytest.mark.parametrize("size", SIZES)
def test_a_pool_two_graphs_share_stays_private_until_both_are_released(size):
    configure("64MiB")
    for _ in range(2):  # two graphs captured into one pool, one after the other
        begin(1)
        free(alloc(size, CAPTURED))
        end(1)
    release(1)  # the first graph is gone; the second still replays into the pool
    torch_ellm.empty_cache()
    assert stats()["reserved_bytes.all.current"] >= size
    release(1)
    assert_all_returned()


def test_a_pool_released_during_another_capture_stays_private_until_that_capture_ends():
    """Freeing a pool synchronizes (its graph's last replay may still run), which a capture forbids."""
    configure("64MiB")
    begin(1)
    output = alloc(300 * KiB, CAPTURED)
    end(1)
    begin(2, on_other_stream)  # another graph's capture, on another stream
    release(1)  # graph 1 is deleted meanwhile
    free(output)
    eager = alloc(300 * KiB, CAPTURED)  # not claimed by graph 2: the shared cache, which must not have it yet
    assert eager != output
    end(2)
    assert alloc(300 * KiB, CAPTURED) == output  # after the capture: synchronized and shared
    free(output)
    free(eager)
    release(2)
    assert_all_returned()


def test_a_pool_released_and_begun_again_during_a_capture_stays_private():
    configure("64MiB")
    begin(1)
    free(alloc(300 * KiB, CAPTURED))
    end(1)
    begin(2, on_other_stream)
    release(1)  # no graph uses pool 1 ...
    begin(1)  # ... until a new graph is captured into it, beside graph 2
    end(1)
    end(2)
    torch_ellm.empty_cache()
    assert stats()["reserved_bytes.all.current"] >= 300 * KiB  # still the new graph's
    release(1)
    release(2)
    assert_all_returned()


def test_a_block_other_streams_used_waits_for_the_capture_to_end():
    """Recording an event is illegal while capturing: a block freed then, with work queued on another
    stream, is held until the capture ends, then waits on its events like any other."""
    configure("64MiB")
    begin(1)
    block = alloc(300 * KiB, CAPTURED)
    assert lib.torch_ellm_record_stream(block, 0, 9) == OK, last_error()
    free(block)
    assert stats()["active_bytes.all.current"] >= 300 * KiB  # not reusable yet
    other = alloc(300 * KiB, CAPTURED)
    assert other != block
    end(1)
    free(alloc(64, stream=0))  # an allocation outside a capture checks events: the block is the pool's again
    begin(1)  # a second graph in the pool
    assert alloc(300 * KiB, CAPTURED) == block
    free(block)
    free(other)
    end(1)
    release(1)
    release(1)
    assert_all_returned()


def test_a_capture_makes_the_pool_neither_borrow_nor_shrink_others():
    """Borrowing copies and shrinking unmaps, and both synchronize: during a capture, out of memory."""
    torch_ellm.configure("host", budget="1MiB", host_budget="1MiB", chunk="64KiB", granularity="64KiB")
    pool = torch_ellm.pool(0)
    kv = pool.virtual_tensor("1MiB", tag="kv")
    kv.resize("768KiB")  # 12 of 16 chunks, borrowable
    begin(1)
    code, _ = try_alloc(512 * KiB, CAPTURED)
    assert code == OOM
    assert pool.stats()["borrowed_bytes"] == 0
    end(1)
    block = alloc(512 * KiB, CAPTURED)  # outside a capture, kv lends its cold chunks
    assert pool.stats()["borrowed_bytes"] > 0
    free(block)
    kv.release()
    release(1)
    assert_all_returned()


def test_empty_cache_during_a_capture_leaves_the_pool_untrimmed():
    """Trimming may free page-locked host buffers, which synchronizes: not while capturing."""
    configure("1MiB")
    pool = torch_ellm.pool(0)
    kv = pool.virtual_tensor("1MiB", tag="kv")
    kv.resize("256KiB")
    kv.resize(0)  # its chunks stay in the pool's cache
    begin(1)
    torch_ellm.empty_cache()
    assert pool.stats()["device_cached_bytes"] == 256 * KiB
    end(1)
    torch_ellm.empty_cache()
    assert pool.stats()["device_cached_bytes"] == 0
    kv.release()
    release(1)
    assert_all_returned()


def test_bad_calls_get_clear_errors():
    configure("64MiB")
    assert lib.torch_ellm_begin_allocate_to_pool(0, 0, on_captured_stream, None) == INVALID
    assert "must not be 0" in last_error()
    assert lib.torch_ellm_end_allocate_to_pool(0, 5) == INVALID
    assert "without a capture into that pool" in last_error()
    begin(5)
    assert lib.torch_ellm_begin_allocate_to_pool(0, 5, on_captured_stream, None) == INVALID
    assert "already allocating to private pool 5" in last_error()
    end(5)
    release(5)
    release(5)  # again, or a pool never seen (PyTorch releases from destructors): nothing to do
    assert_all_returned()


def test_configure_refuses_while_a_graph_pool_lives():
    configure("64MiB")
    begin(1)
    free(alloc(4 * KiB, CAPTURED))
    end(1)
    with pytest.raises(ValueError, match="CUDA graph pools"):
        configure("64MiB")  # dropping the allocator would unmap what the graph replays into
    release(1)
    assert_all_returned()
