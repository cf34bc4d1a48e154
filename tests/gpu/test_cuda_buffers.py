"""CUDA buffers, pinned staging and the double-buffered batch stager on a real GPU."""

import numpy as np
import pytest

from quantkit.datasets import Batcher, SyntheticSource

pytestmark = pytest.mark.gpu


def test_round_trip_pinned_and_pageable():
    from quantkit import cuda

    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    with cuda.Stream() as stream, cuda.DeviceBuffer(x.nbytes) as dev, cuda.PinnedBuffer(x.nbytes) as pin:
        pin.view(np.float32, x.shape)[...] = x
        dev.copy_from_host(pin, stream)
        back = cuda.PinnedBuffer(x.nbytes)
        dev.copy_to_host(back, stream)
        stream.synchronize()
        np.testing.assert_array_equal(back.view(np.float32, x.shape), x)
        back.close()
        # pageable arrays take the synchronous path
        y = np.empty_like(x)
        dev.copy_from_host(x * 2)
        dev.copy_to_host(y)
        np.testing.assert_array_equal(y, x * 2)
    assert dev.closed and pin.closed and stream.closed
    with pytest.raises(ValueError, match="does not fit"):
        with cuda.DeviceBuffer(16) as small:
            small.copy_from_host(x)


def test_no_leak_over_many_allocations():
    from quantkit import cuda

    x = np.ones(1 << 20, np.float32)  # 4 MiB
    with cuda.DeviceBuffer(16):  # context initialised before the first reading
        pass
    free0, _ = cuda.mem_info()
    for _ in range(300):
        with cuda.Stream() as s, cuda.DeviceBuffer(x.nbytes) as d, cuda.PinnedBuffer(x.nbytes) as p:
            p.view(np.float32, x.shape)[...] = x
            d.copy_from_host(p, s)
            s.synchronize()
    free1, _ = cuda.mem_info()
    assert free0 - free1 < 8 << 20  # 300 x 4 MiB would be 1.2 GiB if leaked


def test_stager_serves_batches_in_order_and_keeps_them_until_next_call():
    from quantkit import cuda

    src = SyntheticSource((3, 16, 16), count=37, seed=5)
    batches = Batcher(src, ["x"], 8, last_batch="keep")
    ref = [b.feed["x"][: b.size].copy() for b in Batcher(src, ["x"], 8, last_batch="keep")]
    got = []
    with cuda.BatchStager(batches, {"x": (np.float32, (8, 3, 16, 16))}) as stager:
        while (ptrs := stager.next_pointers()) is not None:
            n = stager.last_batch.size
            host = np.empty((n, 3, 16, 16), np.float32)
            # read the device buffer through a temporary DeviceBuffer-free copy
            rt = cuda.cudart()
            cuda.check(rt.cudaMemcpy(host.ctypes.data, ptrs["x"], host.nbytes,
                                     rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "readback")
            got.append(host)
        assert stager.batches_staged == 5
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_calibrator_core_feeds_device_pointers():
    """The calibrator body with the real GPU stager (TensorRT's base class not needed)."""
    from quantkit import cuda
    from quantkit.backends.tensorrt.calibrator import CalibratorCore

    src = SyntheticSource((3, 8, 8), count=16, seed=2)
    core = CalibratorCore(Batcher(src, ["x"], 4, last_batch="drop"), 4)
    rt = cuda.cudart()
    seen = 0
    while (ptrs := core.get_batch(["x"])) is not None:
        host = np.empty((4, 3, 8, 8), np.float32)
        cuda.check(rt.cudaMemcpy(host.ctypes.data, ptrs[0], host.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "rb")
        np.testing.assert_array_equal(host, np.stack([src.load(i) for i in range(seen * 4, seen * 4 + 4)]))
        seen += 1
    core.raise_if_failed()
    core.close()
    assert seen == 4
