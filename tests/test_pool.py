"""Pool and VirtualTensor on the host backend (issue 2), with small chunks (4 KiB to 64 KiB)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torch_ellm
from vt_helpers import (THREADED, THREADS, KiB, Mirror, check_empty, check_totals, create_or_step, play,
                        run_isolated, thread_rounds)

C = 4 * KiB  # chunk for the hand-written tests


def host_pool(chunk=C, budget_chunks=16, host_budget_chunks=0):
    return torch_ellm.Pool("host", budget_bytes=budget_chunks * chunk, host_budget_bytes=host_budget_chunks * chunk,
                           chunk_bytes=chunk)


def mapped(max_bytes, nbytes):
    """A fresh pool and a virtual tensor in it with nbytes mapped."""
    pool = host_pool()
    vt = pool.virtual_tensor(max_bytes)
    vt.resize(nbytes)
    return pool, vt


# ---------------------------------------------------------------- random create/resize/write/release


@THREADED
@given(rounds=thread_rounds(["resize", "resize", "write", "release"]), chunk=st.sampled_from([4 * KiB, 16 * KiB, 64 * KiB]), budget_chunks=st.integers(4, 40))
def test_random_create_resize_release_keeps_invariants(rounds, chunk, budget_chunks):
    pool = host_pool(chunk, budget_chunks)
    gens = [torch.Generator().manual_seed(t) for t in range(THREADS)]
    play(pool, rounds, lambda t, row, op: create_or_step(pool, row, op, gens[t], torch_ellm.TAGS))


# ---------------------------------------------------------------- budget


def test_resize_past_budget_raises_oom_and_leaves_pool_usable():
    pool = host_pool(budget_chunks=8)
    gen = torch.Generator().manual_seed(0)
    a, b = Mirror(pool, 16 * C), Mirror(pool, 16 * C, tag="kv")
    a.resize(5 * C, gen)
    b.resize(C + 100, gen)  # 7 of 8 chunks in use
    before = pool.stats()
    with pytest.raises(torch.OutOfMemoryError) as err:
        b.vt.resize(5 * C)
    assert isinstance(err.value, torch_ellm.OutOfMemoryError)
    # The message says what was asked, what is in use and what the budget is.
    message = str(err.value)
    for amount in (3 * C, 7 * C, 8 * C):
        assert torch_ellm.format_bytes(amount) in message, message
    after = pool.stats()
    assert after.pop("num_ooms") == before.pop("num_ooms") + 1
    assert after == before
    a.check()
    b.check()
    b.resize(3 * C, gen)  # exactly up to the budget still works
    check_totals(pool, [a, b])
    with pytest.raises(torch.OutOfMemoryError):
        a.vt.resize(7 * C)
    a.release()
    b.resize(8 * C, gen)  # a's chunks came back to the pool
    b.check()
    b.release()
    check_empty(pool)


def test_cached_chunks_stay_within_budget_and_trim_frees_them():
    pool = host_pool(budget_chunks=8)
    gen = torch.Generator().manual_seed(1)
    a = Mirror(pool, 8 * C)
    a.resize(8 * C, gen)
    a.resize(2 * C, gen)
    s = pool.stats()
    assert (s["device_bytes"], s["device_cached_bytes"], s["device_peak_bytes"]) == (2 * C, 6 * C, 8 * C)
    b = Mirror(pool, 8 * C)
    b.resize(6 * C, gen)  # reuses the cache: physical memory does not grow
    assert pool.stats()["device_physical_bytes"] == 8 * C
    b.release()
    assert pool.trim() == 6 * C
    s = pool.stats()
    assert (s["device_physical_bytes"], s["device_physical_peak_bytes"]) == (2 * C, 8 * C)  # made at most 8
    a.check()
    a.release()
    check_empty(pool)


# ---------------------------------------------------------------- views


def test_views_share_memory():
    pool, vt = mapped(4 * C, 2 * C)
    floats = vt.as_tensor(2 * C // 4, torch.float32)
    raw = vt.as_tensor(2 * C, torch.uint8)
    longs = vt.as_tensor((2, C // 16), torch.int64, offset=C)
    assert floats.device.type == "cpu"
    assert floats.data_ptr() == raw.data_ptr() == vt.data_ptr()
    assert longs.data_ptr() == vt.data_ptr() + C
    floats[0] = 1.0
    assert raw[:4].tolist() == list(torch.tensor([1.0]).view(torch.uint8).tolist())
    raw[C:C + 8] = 255
    assert longs[0, 0].item() == -1
    longs[1, -1] = 7
    assert raw[-8:].tolist() == [7, 0, 0, 0, 0, 0, 0, 0]
    del floats, raw, longs
    vt.release()
    check_empty(pool)


def test_view_stays_valid_while_tensor_grows():
    _, vt = mapped(8 * C, C)
    first = vt.as_tensor(C, torch.uint8)
    first.fill_(9)
    vt.resize(8 * C)
    assert vt.as_tensor(C, torch.uint8).data_ptr() == first.data_ptr()
    assert bool((first == 9).all())
    del first
    vt.release()


def test_shrink_below_live_view_raises_and_changes_nothing():
    pool = host_pool()
    m = Mirror(pool, 4 * C)
    m.resize(3 * C, torch.Generator().manual_seed(2))
    view = m.vt.as_tensor(2 * C + 1, torch.uint8)
    with pytest.raises(ValueError, match="view"):
        m.vt.resize(C)
    assert m.vt.nbytes == 3 * C
    m.vt.resize(2 * C + 1)  # still covers the view's last chunk
    m.expected = m.expected[: 2 * C + 1]
    del view
    m.check()
    m.vt.resize(C)
    m.release()
    check_empty(pool)


def test_release_with_live_view_raises_then_works():
    pool, vt = mapped(2 * C, C)
    view = vt.as_tensor(4, torch.int8)
    with pytest.raises(ValueError, match="view"):
        vt.release()
    assert not vt.released and vt.mapped_bytes == C
    del view
    vt.release()
    assert vt.released
    check_empty(pool)


# ---------------------------------------------------------------- bad input


USE_AFTER_RELEASE = {
    "resize": lambda vt: vt.resize(C),
    "release": lambda vt: vt.release(),
    "as_tensor": lambda vt: vt.as_tensor(1, torch.uint8),
    "offload": lambda vt: vt.offload(0, 0),
    "prefetch": lambda vt: vt.prefetch(0, 0),
    "pinned": lambda vt: vt.pinned().__enter__(),
}


@pytest.mark.parametrize("use", USE_AFTER_RELEASE, ids=str)
def test_use_after_release_raises_released_error(use):
    pool, vt = mapped(2 * C, C)
    vt.release()
    with pytest.raises(torch_ellm.ReleasedError):
        USE_AFTER_RELEASE[use](vt)
    check_empty(pool)


BAD_CALLS = {
    "negative max_bytes": lambda p, vt: p.virtual_tensor(-1),
    "zero max_bytes": lambda p, vt: p.virtual_tensor(0),
    "absurd max_bytes": lambda p, vt: p.virtual_tensor(1 << 60),
    "max_bytes not a size": lambda p, vt: p.virtual_tensor("lots"),
    "unknown tag": lambda p, vt: p.virtual_tensor(C, tag="gradients"),
    "negative resize": lambda p, vt: vt.resize(-1),
    "resize past max": lambda p, vt: vt.resize(vt.max_bytes + 1),
    "absurd resize": lambda p, vt: vt.resize(1 << 60),
    "view past mapped bytes": lambda p, vt: vt.as_tensor(vt.mapped_bytes + 1, torch.uint8),
    "negative view shape": lambda p, vt: vt.as_tensor([-1], torch.uint8),
    "unsupported view dtype": lambda p, vt: vt.as_tensor(1, torch.complex64),
    "misaligned view offset": lambda p, vt: vt.as_tensor(1, torch.float32, offset=1),
    "offload past mapped bytes": lambda p, vt: vt.offload(0, vt.mapped_bytes + C),
    "offload reversed range": lambda p, vt: vt.offload(C, 0),
    "unpin without pin": lambda p, vt: vt._vt.unpin(),
    "unknown consumer": lambda p, vt: p.remove_consumer(12345),
    "policy for unknown tag": lambda p, vt: p.set_policy(borrow={"gradients": True}),
    "negative budget": lambda p, vt: p.set_budget(-1),
}


@pytest.mark.parametrize("call", BAD_CALLS, ids=str)
def test_bad_call_raises_value_error_and_pool_stays_usable(call):
    pool = host_pool()
    m = Mirror(pool, 4 * C)
    gen = torch.Generator().manual_seed(3)
    m.resize(C + 5, gen)
    with pytest.raises(ValueError):
        BAD_CALLS[call](pool, m.vt)
    m.check()
    m.resize(3 * C, gen)
    m.check()
    m.release()
    check_empty(pool)


BAD_POOLS = {
    "unknown backend": dict(backend="tpu"),
    "zero chunk": dict(chunk_bytes=0),
    "chunk not a multiple of granularity": dict(chunk_bytes=6 * KiB, granularity=4 * KiB),
    "granularity not a power of two": dict(chunk_bytes=12 * KiB, granularity=12 * KiB),
    "granularity below the page": dict(chunk_bytes=4 * KiB, granularity=1 * KiB),
    "granularity above 1 GiB": dict(chunk_bytes=2 << 30, granularity=2 << 30),
    "negative budget": dict(budget_bytes=-1),
    "negative host budget": dict(host_budget_bytes=-1),
    "negative device": dict(device=-1),
}


@pytest.mark.parametrize("case", BAD_POOLS, ids=str)
def test_bad_pool_arguments_raise_value_error(case):
    kwargs = dict(backend="host", budget_bytes=1 << 20, chunk_bytes=C) | BAD_POOLS[case]
    with pytest.raises(ValueError):
        torch_ellm.Pool(**kwargs)


@pytest.mark.parametrize("call", ["virtual_tensor", "resize"])
def test_sizes_past_64_bits_raise_value_error(call):
    """Such sizes used to reach pybind11, which answered TypeError ("incompatible function arguments");
    parse_bytes now bounds sizes below 2**63."""
    pool = host_pool()
    vt = pool.virtual_tensor(C)
    with pytest.raises(ValueError):
        pool.virtual_tensor(1 << 64) if call == "virtual_tensor" else vt.resize(1 << 64)
    vt.release()


VIEW_OVERFLOW = """
import torch, torch_ellm
pool = torch_ellm.Pool("host", budget_bytes=1 << 20, chunk_bytes=4096)
vt = pool.virtual_tensor(1 << 16)
vt.resize(1 << 16)
try:
    view = vt.as_tensor({shape}, torch.uint8, offset={offset})
    print("no error: a view at offset", view.data_ptr() - vt.data_ptr(), "of", view.numel(), "bytes")
    view.sum()
except ValueError as e:
    print("ValueError:", e)
vt.release()
print("released")
"""


@pytest.mark.parametrize("shape, offset", [([8], (1 << 64) - 8), ([1 << 32, 1 << 32], 0)],
                         ids=["offset wraps", "shape product wraps"])
def test_view_size_overflow_is_rejected(shape, offset):
    """A view whose size or offset wraps around 64 bits used to reach torch (a view outside the
    mapped range, or a crash); now it is a ValueError before anything is made."""
    proc = run_isolated(VIEW_OVERFLOW.format(shape=shape, offset=offset))
    assert proc.returncode == 0, f"interpreter died (rc {proc.returncode}): {proc.stdout}{proc.stderr[-2000:]}"
    assert "ValueError" in proc.stdout and "released" in proc.stdout, proc.stdout


# ---------------------------------------------------------------- stats


def test_stats_keys_and_bytes_by_tag():
    pool = host_pool(budget_chunks=16)
    gen = torch.Generator().manual_seed(4)
    weights, kv = Mirror(pool, 8 * C, tag="weights"), Mirror(pool, 2 * C + 1, tag="kv")
    weights.resize(3 * C - 1, gen)
    kv.resize(C + 1, gen)
    s = pool.stats()
    for key in ("reserved_address_bytes", "mapped_device_bytes", "mapped_host_bytes", "device_bytes",
                "device_cached_bytes", "device_peak_bytes", "borrowed_bytes", "borrowed_peak_bytes",
                "budget_bytes", "host_budget_bytes", "chunk_bytes", "num_ooms"):
        assert isinstance(s[key], int), key
    assert s["reserved_address_bytes"] == 8 * C + 3 * C
    assert s["bytes_by_tag"] == {"weights": {"device_bytes": 3 * C, "host_bytes": 0},
                                 "kv": {"device_bytes": 2 * C, "host_bytes": 0},
                                 "activations": {"device_bytes": 0, "host_bytes": 0},
                                 "other": {"device_bytes": 0, "host_bytes": 0}}
    assert (weights.vt.tag, kv.vt.tag) == ("weights", "kv")
    check_totals(pool, [weights, kv])
    weights.release()
    s = pool.stats()
    assert (s["device_bytes"], s["device_peak_bytes"], s["device_cached_bytes"]) == (2 * C, 5 * C, 3 * C)
    assert s["bytes_by_tag"]["weights"]["device_bytes"] == 0
    kv.release()
    check_empty(pool)


def test_host_capabilities():
    pool = host_pool(chunk=16 * KiB)
    caps = pool.capabilities()
    assert caps["virtual_memory"] and caps["host_chunks"]
    assert caps["granularity"] == 16 * KiB == pool.chunk_bytes


def test_grant_access_on_host_is_a_clear_error_and_changes_nothing():
    pool = torch_ellm.Pool("host", budget_bytes=1 << 20, chunk_bytes=4096)
    vt = pool.virtual_tensor(16 * 4096)
    vt.resize(4096)
    with pytest.raises(ValueError, match="no device 1"):
        vt.grant_access(1)
    vt.resize(8 * 4096)  # not remembered as a peer: growing does not try to grant it again
    assert vt.mapped_bytes == 8 * 4096
    vt.release()
