"""Host buffers (Pool.host_buffer): page-locked host memory from the pool's host budget, shared with
borrowed chunks, viewed as CPU tensors, given back on release."""
import threading

import pytest
import torch

import torch_ellm
from vt_helpers import KiB, Mirror, check_empty

C = 4 * KiB


def make_pool(budget_chunks=8, host_budget_chunks=8, host_tier="auto"):
    return torch_ellm.Pool("host", budget_bytes=budget_chunks * C, host_budget_bytes=host_budget_chunks * C,
                           chunk_bytes=C, host_tier=host_tier)


def test_buffer_is_counted_viewed_and_given_back():
    pool = make_pool()
    buf = pool.host_buffer(2 * C + 1, tag="kv")
    assert buf.nbytes == 3 * C  # whole chunks
    assert pool.host_buffer_bytes == 3 * C and pool.borrowed_bytes == 0
    assert pool.stats()["bytes_by_tag"]["kv"] == {"device_bytes": 0, "host_bytes": 3 * C}
    view = buf.as_tensor((3, C // 8), torch.int64)
    assert view.device.type == "cpu"
    view.copy_(torch.arange(view.numel()).view_as(view))
    again = buf.as_tensor(C // 8, torch.int64, offset=C)  # a second view sees the same bytes
    assert torch.equal(again, view[1])
    with pytest.raises(ValueError, match="view"):
        buf.release()
    del view, again
    buf.release()
    buf.release()  # again: no-op
    assert buf.released and pool.host_buffer_bytes == 0
    with pytest.raises(torch_ellm.ReleasedError):
        buf.as_tensor(1, torch.uint8)
    check_empty(pool)


def test_bad_requests_are_refused():
    pool = make_pool()
    with pytest.raises(ValueError, match="nbytes > 0"):
        pool.host_buffer(0)
    with pytest.raises(ValueError, match="tag"):
        pool.host_buffer(C, tag="scratch")
    with pytest.raises(ValueError):
        pool.host_buffer(-1)
    buf = pool.host_buffer(C)
    with pytest.raises(ValueError, match="past"):
        buf.as_tensor(C + 1, torch.uint8)
    with pytest.raises(ValueError, match="multiple"):
        buf.as_tensor(1, torch.int32, offset=2)
    buf.release()
    check_empty(pool)


@pytest.mark.parametrize("host_tier", ["mapped", "parked"])
def test_buffers_and_borrowing_share_the_host_budget(host_tier):
    pool = make_pool(budget_chunks=4, host_budget_chunks=4, host_tier=host_tier)
    buf = pool.host_buffer(3 * C)
    with pytest.raises(torch_ellm.OutOfMemoryError, match="in host buffers"):
        pool.host_buffer(2 * C, optional=True)
    assert pool.stats()["num_ooms"] == 0  # the caller said it can do without: not an OOM
    with pytest.raises(torch_ellm.OutOfMemoryError, match="in host buffers"):
        pool.host_buffer(2 * C)
    assert pool.stats()["num_ooms"] == 1
    old = Mirror(pool, 4 * C, tag="kv")
    old.resize(4 * C, torch.Generator().manual_seed(0))
    assert old.vt.offload(0, C) == C  # one chunk of host budget left
    with pytest.raises(torch_ellm.OutOfMemoryError):
        old.vt.offload(C, 2 * C)
    assert pool.borrowed_bytes == C and pool.host_buffer_bytes == 3 * C
    buf.release()
    assert old.vt.offload(C, 3 * C) == 2 * C  # the buffer's room is free for borrowing again
    old.vt.prefetch()
    old.check()
    old.release()
    check_empty(pool)


def test_cached_host_chunks_never_push_past_the_budget():
    """Chunks a borrow left cached count as physical host memory: a buffer taking the budget drops them."""
    pool = make_pool(budget_chunks=4, host_budget_chunks=4)
    m = Mirror(pool, 4 * C, tag="kv")
    m.resize(4 * C, torch.Generator().manual_seed(0))
    m.vt.offload()
    m.vt.prefetch()  # four host chunks now cached
    assert pool.stats()["host_cached_bytes"] == 4 * C
    buf = pool.host_buffer(4 * C)
    s = pool.stats()
    assert s["host_cached_bytes"] == 0 and s["host_buffer_bytes"] == 4 * C
    buf.release()
    m.release()
    check_empty(pool)


def test_threads_never_pass_the_budget_or_share_bytes():
    pool = make_pool(host_budget_chunks=6)
    peaks, errors = [], []

    def worker(seed):
        gen = torch.Generator().manual_seed(seed)
        try:
            for _ in range(200):
                n = int(torch.randint(1, 4, (), generator=gen)) * C
                try:
                    buf = pool.host_buffer(n)
                except torch_ellm.OutOfMemoryError:
                    continue
                peaks.append(pool.host_buffer_bytes)
                view = buf.as_tensor(n, torch.uint8)
                view.fill_(seed)
                assert bool((view == seed).all()), "another thread wrote into this buffer"
                del view
                buf.release()
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert max(peaks) <= 6 * C
    assert pool.stats()["borrowed_peak_bytes"] == 0  # buffers are not borrowed chunks
    check_empty(pool)


def test_released_buffers_are_cached_reused_and_trimmed():
    pool = make_pool(host_budget_chunks=8)
    first = pool.host_buffer(2 * C)
    addr = first.data_ptr()
    first.release()
    assert pool.host_buffer_bytes == 0 and pool.stats()["host_buffer_cached_bytes"] == 2 * C
    again = pool.host_buffer(2 * C)
    assert again.data_ptr() == addr and pool.stats()["host_buffer_cached_bytes"] == 0
    again.release()
    bigger = pool.host_buffer(3 * C)  # 2 chunks cached, 3 wanted: a new buffer
    assert bigger.nbytes == 3 * C and pool.stats()["host_buffer_cached_bytes"] == 2 * C
    bigger.release()
    assert pool.trim() == 5 * C  # both cached buffers freed
    pool.host_buffer(3 * C).release()
    smaller = pool.host_buffer(2 * C)  # 3 chunks cached (1.5x of 2): taken as it is
    assert smaller.nbytes == 3 * C and pool.host_buffer_bytes == 3 * C
    smaller.release()
    tiny = pool.host_buffer(C)  # nothing cached within 1.5x of 1 chunk
    assert tiny.nbytes == C
    tiny.release()
    assert pool.trim() == 4 * C
    assert pool.stats()["host_buffer_cached_bytes"] == 0
    check_empty(pool)


def test_cached_buffers_give_way_to_the_budget():
    """Cached buffers are physical host memory: a borrow or a new buffer that needs the room drops them."""
    pool = make_pool(budget_chunks=4, host_budget_chunks=4)
    pool.host_buffer(4 * C).release()
    assert pool.stats()["host_buffer_cached_bytes"] == 4 * C
    m = Mirror(pool, 4 * C, tag="kv")
    m.resize(4 * C, torch.Generator().manual_seed(0))
    assert m.vt.offload(0, 2 * C) == 2 * C
    s = pool.stats()
    assert s["host_buffer_cached_bytes"] == 0 and s["borrowed_bytes"] == 2 * C
    m.vt.prefetch()
    m.check()
    m.release()
    pool.host_buffer(3 * C).release()  # 3 cached, the budget's 4 chunks: a 1-chunk buffer drops nothing
    one = pool.host_buffer(C)
    assert pool.stats()["host_buffer_cached_bytes"] == 3 * C
    two = pool.host_buffer(2 * C)  # 1 + 2 live and 3 cached would pass 4: the cache goes
    assert pool.stats()["host_buffer_cached_bytes"] == 0
    one.release(), two.release()
    check_empty(pool)
