"""The cuda backend through Pool(backend="cuda") (issues 2 and 4): map, write and read through torch
tensors, host-located chunks read by kernels, budgets and borrowing. Skipped without CUDA."""
import threading

import pytest
import torch

import torch_ellm

pytestmark = pytest.mark.gpu
MiB = 1 << 20


@pytest.fixture
def pool():
    p = torch_ellm.Pool("cuda", device=0, budget_bytes=64 * MiB, host_budget_bytes=32 * MiB)
    yield p
    p.trim()


def expect_empty(pool):
    s = pool.stats()
    for key in ("device_bytes", "borrowed_bytes", "mapped_device_bytes", "mapped_host_bytes", "reserved_address_bytes"):
        assert s[key] == 0, (key, s[key])


def floats(vt, nbytes):
    return vt.as_tensor(nbytes // 4, torch.float32)


def mapped(pool, chunks, tag="kv", max_chunks=None):
    vt = pool.virtual_tensor((max_chunks or chunks) * pool.chunk_bytes, tag=tag)
    vt.resize(chunks * pool.chunk_bytes)
    return vt


def filled(pool, chunks):
    """A kv tensor of `chunks` chunks, a float view of all of it filled with seeded random values, and a copy."""
    vt = mapped(pool, chunks)
    view = floats(vt, chunks * pool.chunk_bytes)
    view.copy_(torch.randn(view.numel(), device="cuda", generator=torch.Generator("cuda").manual_seed(0)))
    return vt, view, view.clone()


def require_host_chunks(pool):
    if not pool.capabilities()["host_chunks"]:
        pytest.skip("this device reports no host-located VMM chunks (attributes 141/145)")


def test_granularity_and_capabilities(pool):
    caps = pool.capabilities()
    assert caps["virtual_memory"]
    g = caps["granularity"]
    assert g > 0 and g & (g - 1) == 0, g
    assert pool.chunk_bytes % g == 0
    assert caps["device_name"]
    assert caps["host_chunks"] == (caps["host_location"] in ("HOST_NUMA", "HOST")), caps


def test_map_write_read_unmap_through_torch(pool):
    chunk = pool.chunk_bytes
    vt = mapped(pool, 2, max_chunks=8)
    view = floats(vt, 2 * chunk)
    assert view.is_cuda and view.device == torch.device("cuda", 0)
    assert view.data_ptr() == vt.data_ptr()
    expected = torch.arange(view.numel(), device="cuda", dtype=torch.float32)
    view.copy_(expected)
    ints = vt.as_tensor(2 * chunk // 4, torch.int32)  # another view of the same bytes
    assert torch.equal(ints.view(torch.float32), expected)
    ints[0] = 0x3F800000  # the bit pattern of 1.0f
    assert view[0].item() == 1.0
    expected[0] = 1.0
    del ints
    vt.resize(8 * chunk)  # grows at the same address; old bytes intact
    assert vt.data_ptr() == view.data_ptr()
    assert torch.equal(view, expected)
    assert pool.stats()["mapped_device_bytes"] == 8 * chunk
    del view
    vt.resize(0)
    assert pool.stats()["mapped_device_bytes"] == 0
    vt.release()
    expect_empty(pool)


def test_resize_from_a_thread_that_never_used_cuda(pool):
    chunk = pool.chunk_bytes
    vt = pool.virtual_tensor(4 * chunk)
    errors = []

    def grow():
        try:
            vt.resize(4 * chunk)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    worker = threading.Thread(target=grow)
    worker.start()
    worker.join()
    assert not errors, errors
    view = floats(vt, 4 * chunk)
    view.fill_(3.0)
    assert view.sum().item() == 3.0 * view.numel()
    del view
    vt.release()
    expect_empty(pool)


def test_offloaded_chunk_is_read_and_written_by_kernels(pool):
    require_host_chunks(pool)
    chunk = pool.chunk_bytes
    vt, view, before = filled(pool, 4)
    assert vt.offload() == 4 * chunk
    assert vt.chunk_locations() == ["host"] * 4 and pool.borrowed_bytes == 4 * chunk
    assert vt.data_ptr() == view.data_ptr()
    assert torch.equal(view, before)  # a kernel reads host-located memory at the same address
    assert view.sum().item() == pytest.approx(before.sum().item(), rel=1e-5)
    view.mul_(2)  # and writes it
    torch.cuda.synchronize()
    assert vt.prefetch() == 4 * chunk
    assert torch.equal(view, before * 2)
    del view
    vt.release()
    expect_empty(pool)


def test_parked_fallback_copies_out_and_back():
    """host_tier='parked' is what devices without host-located chunks get: forced here so every GPU runs it."""
    pool = torch_ellm.Pool("cuda", device=0, budget_bytes=64 * MiB, host_budget_bytes=32 * MiB, host_tier="parked")
    chunk = pool.chunk_bytes
    vt, view, before = filled(pool, 4)
    del view  # a live view would refuse the park
    assert vt.offload(chunk, 3 * chunk) == 2 * chunk
    assert vt.chunk_locations() == ["device", "host", "host", "device"]
    s = pool.stats()
    assert (s["borrowed_bytes"], s["mapped_host_bytes"], s["device_bytes"]) == (2 * chunk, 0, 2 * chunk)
    with pytest.raises(ValueError, match="parked"):
        floats(vt, 4 * chunk)
    assert vt.prefetch() == 2 * chunk
    assert torch.equal(floats(vt, 4 * chunk), before)
    vt.release()
    expect_empty(pool)
    pool.trim()


def test_budget_oom_and_borrowing_on_cuda(pool):
    require_host_chunks(pool)
    chunk = pool.chunk_bytes
    budget = pool.budget_bytes // chunk
    old, old_view, expected = filled(pool, budget)
    weights = mapped(pool, 2, tag="weights", max_chunks=budget)  # borrows two chunks of the kv tensor
    assert old.host_bytes == pool.borrowed_bytes == 2 * chunk
    assert torch.equal(old_view, expected)
    s = pool.stats()
    assert s["device_bytes"] <= s["budget_bytes"] and s["borrowed_bytes"] <= s["host_budget_bytes"]
    with pytest.raises(torch.OutOfMemoryError):
        weights.resize(budget * chunk)  # host budget (32 MiB) cannot take the rest
    assert weights.nbytes == 2 * chunk and torch.equal(old_view, expected)
    del old_view
    for vt in (old, weights):
        vt.release()
    expect_empty(pool)
