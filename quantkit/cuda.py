"""CUDA streams, device buffers and pinned host buffers through cuda-python (cuda-bindings).

Everything here owns what it allocates and frees it on ``close()`` (or leaving a ``with``
block, or garbage collection as a last resort). Host-to-device copies go through pinned
staging buffers, asynchronously on a stream: pinned copies run several times faster than copies
from pageable memory (benchmarks/results/design_notes.md).

``BatchStager`` double-buffers calibration batches on the GPU: while a consumer (TensorRT's
calibrator) reads slot A, the next batch is copied into pinned slot B and sent to the device
on a second stream; the data loader decodes further batches in its own threads meanwhile.

    batches -> [pinned A | pinned B] --async H2D--> [device A | device B] -> pointers
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np

from quantkit.errors import MissingDependencyError, QuantkitError

_cudart: ModuleType | None = None


class CudaError(QuantkitError):
    """A CUDA runtime call failed."""


def cudart() -> ModuleType:
    """The CUDA runtime module of cuda-python (``cuda.bindings.runtime``; ``cuda.cudart`` on
    releases before 12.6), imported on first use."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            try:
                from cuda import cudart as rt  # type: ignore[no-redef]
            except ImportError as err:
                raise MissingDependencyError(
                    "cuda-python is required for GPU buffers but is not installed",
                    hint="install it with `pip install 'quantkit[gpu]'` (needs an NVIDIA driver)",
                ) from err
        _cudart = rt
    return _cudart


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python result tuple ``(error, *values)``; raise CudaError on failure."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, text = rt.cudaGetErrorString(err)
        name = getattr(err, "name", str(err))
        raise CudaError(f"{what} failed: {name}: {text.decode() if isinstance(text, bytes) else text}",
                        hint="check that an NVIDIA GPU and driver are present (nvidia-smi) and memory is free")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    """Number of CUDA devices (0 when the driver or cuda-python is missing)."""
    try:
        return int(check(cudart().cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except (QuantkitError, RuntimeError):
        return 0


def mem_info() -> tuple[int, int]:
    """(free, total) device memory in bytes."""
    free, total = check(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


class _Owned:
    """Base for handles freed exactly once: on close(), on leaving ``with``, or on GC."""

    def __init__(self, free: Any, handle: Any):
        self._finalizer = weakref.finalize(self, free, handle)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stream(_Owned):
    """A CUDA stream (non-blocking with respect to the legacy default stream)."""

    def __init__(self) -> None:
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
        super().__init__(rt.cudaStreamDestroy, self.handle)

    @property
    def ptr(self) -> int:
        """The stream as an integer (what TensorRT's ``execute_async_v3`` takes)."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")


class _Allocation(_Owned):
    """``nbytes`` from a cuda-python allocator, freed by its partner (see the subclasses)."""

    _alloc, _free = "", ""

    def __init__(self, nbytes: int):
        if nbytes <= 0:
            raise ValueError(f"buffer size must be positive, got {nbytes}")
        rt = cudart()
        self.nbytes = int(nbytes)
        self.ptr = int(check(getattr(rt, self._alloc)(self.nbytes), f"{self._alloc}({self.nbytes} bytes)"))
        super().__init__(getattr(rt, self._free), self.ptr)


class DeviceBuffer(_Allocation):
    """``nbytes`` of device memory (cudaMalloc)."""

    _alloc, _free = "cudaMalloc", "cudaFree"

    def copy_from_host(self, src: "PinnedBuffer | np.ndarray", stream: Stream | None = None, nbytes: int | None = None) -> None:
        """Host -> device; asynchronous on ``stream`` when ``src`` is pinned, else synchronous."""
        self._copy(src, stream, nbytes, to_device=True)

    def copy_to_host(self, dst: "PinnedBuffer | np.ndarray", stream: Stream | None = None, nbytes: int | None = None) -> None:
        """Device -> host; asynchronous on ``stream`` when ``dst`` is pinned (synchronize the
        stream before reading ``dst``), else synchronous."""
        self._copy(dst, stream, nbytes, to_device=False)

    def _copy(self, host: "PinnedBuffer | np.ndarray", stream: Stream | None, nbytes: int | None, *, to_device: bool) -> None:
        rt = cudart()
        ptr, size = _host_ptr(host)
        n = size if nbytes is None else nbytes
        self._check_size(n)
        kinds = rt.cudaMemcpyKind
        kind, label = (kinds.cudaMemcpyHostToDevice, "H2D") if to_device else (kinds.cudaMemcpyDeviceToHost, "D2H")
        dst, src = (self.ptr, ptr) if to_device else (ptr, self.ptr)
        if stream is not None and isinstance(host, PinnedBuffer):
            check(rt.cudaMemcpyAsync(dst, src, n, kind, stream.handle), f"cudaMemcpyAsync({label})")
        else:
            check(rt.cudaMemcpy(dst, src, n, kind), f"cudaMemcpy({label})")

    def _check_size(self, n: int) -> None:
        if n > self.nbytes:
            raise ValueError(f"copy of {n} bytes does not fit a device buffer of {self.nbytes}")


class PinnedBuffer(_Allocation):
    """``nbytes`` of page-locked host memory (cudaMallocHost), viewable as NumPy arrays."""

    _alloc, _free = "cudaMallocHost", "cudaFreeHost"

    def view(self, dtype: Any, shape: Sequence[int]) -> np.ndarray:
        """A NumPy array over the first bytes of the buffer (valid while the buffer is open)."""
        import ctypes

        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if len(shape) else 1
        if count * dt.itemsize > self.nbytes:
            raise ValueError(f"a {tuple(shape)} {dt} view needs {count * dt.itemsize} bytes, the buffer has {self.nbytes}")
        raw = (ctypes.c_byte * (count * dt.itemsize)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dt, count=count).reshape(shape)


def _host_ptr(obj: PinnedBuffer | np.ndarray) -> tuple[int, int]:
    if isinstance(obj, PinnedBuffer):
        return obj.ptr, obj.nbytes
    if not obj.flags.c_contiguous:
        raise ValueError("host arrays for CUDA copies must be C-contiguous")
    return int(obj.ctypes.data), int(obj.nbytes)


class BatchStager:
    """Double-buffered batches on the GPU, one device buffer per input and slot.

    ``next_pointers()`` returns ``{input name: device pointer}`` for the next batch, with its
    data already on the device; those buffers stay unchanged until the call after next, so a
    consumer may read them until it asks again (TensorRT's calibrator contract). Right after
    returning, the following batch is staged on a worker thread.

    Args:
        batches: any iterable of objects with a ``feed`` dict (quantkit Batch) or plain dicts.
        specs: ``{input name: (dtype, max shape)}``; buffers are sized for the max shape.
    """

    def __init__(self, batches: Iterable[Any], specs: dict[str, tuple[Any, Sequence[int]]]):
        self._specs = {n: (np.dtype(dt), tuple(int(d) for d in shape)) for n, (dt, shape) in specs.items()}
        sizes = {n: dt.itemsize * int(np.prod(shape)) for n, (dt, shape) in self._specs.items()}
        self._it: Iterator[Any] = iter(batches)
        self._lock = threading.Lock()
        self._streams = [Stream(), Stream()]
        self._pinned = [{n: PinnedBuffer(s) for n, s in sizes.items()} for _ in range(2)]
        self._device = [{n: DeviceBuffer(s) for n, s in sizes.items()} for _ in range(2)]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="quantkit-stage")
        self._slot = 0
        self._next: Future[Any] = self._pool.submit(self._stage, 0)
        self.batches_staged = 0
        self.last_batch: Any = None

    def _stage(self, slot: int) -> Any:
        with self._lock:
            batch = next(self._it, None)
        if batch is None:
            return None
        feed = batch.feed if hasattr(batch, "feed") else batch
        stream = self._streams[slot]
        for name, (dtype, max_shape) in self._specs.items():
            if name not in feed:
                raise KeyError(f"batch has no input {name!r} (has {sorted(feed)})")
            arr = np.ascontiguousarray(feed[name], dtype=dtype)
            if arr.ndim != len(max_shape) or any(a > m for a, m in zip(arr.shape, max_shape)):
                raise ValueError(f"input {name!r}: batch shape {arr.shape} exceeds the staged shape {max_shape}")
            host = self._pinned[slot][name]
            host.view(dtype, arr.shape)[...] = arr
            self._device[slot][name].copy_from_host(host, stream, nbytes=arr.nbytes)
        return batch

    def next_pointers(self) -> dict[str, int] | None:
        """Device pointers of the next batch (synchronised), or None when the data is exhausted."""
        batch = self._next.result()
        if batch is None:
            return None
        slot = self._slot
        self._streams[slot].synchronize()
        self.batches_staged += 1
        self.last_batch = batch
        self._slot ^= 1
        self._next = self._pool.submit(self._stage, self._slot)
        return {name: buf.ptr for name, buf in self._device[slot].items()}

    def close(self) -> None:
        """Wait for staging in flight, then free every buffer and stream."""
        self._pool.shutdown(wait=True)
        buffers: list[_Owned] = [b for g in self._device for b in g.values()]
        buffers += [b for g in self._pinned for b in g.values()]
        for buf in buffers:
            buf.close()
        for s in self._streams:
            s.close()

    def __enter__(self) -> "BatchStager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- kernels compiled at run time (NVRTC) and launched on any stream (driver API) -------------

_modules: dict[str, ModuleType] = {}


def _bindings(name: str) -> ModuleType:
    """``cuda.bindings.<name>`` (``cuda.<legacy>`` on cuda-python before 12.6)."""
    if name in _modules:
        return _modules[name]
    import importlib

    legacy = {"driver": "cuda", "nvrtc": "nvrtc"}[name]
    try:
        _modules[name] = importlib.import_module(f"cuda.bindings.{name}")
    except ImportError:
        try:
            _modules[name] = importlib.import_module(f"cuda.{legacy}")
        except ImportError as err:
            raise MissingDependencyError(
                f"cuda-python's {name} bindings are required for quantkit's CUDA kernels but are not installed",
                hint="install it with `pip install 'quantkit[gpu]'` (needs an NVIDIA driver)",
            ) from err
    return _modules[name]


def _check_driver(result: Any, what: str) -> Any:
    drv = _bindings("driver")
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, text = drv.cuGetErrorString(err)
        raise CudaError(f"{what} failed: {getattr(err, 'name', err)}: "
                        f"{text.decode() if isinstance(text, bytes) else text}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def compile_kernels(source: str, names: Sequence[str], *, device: int = 0,
                    defines: dict[str, Any] | None = None) -> list[Any]:
    """Compile CUDA C ``source`` with NVRTC for ``device``'s architecture, load it into the
    device's primary context (PyTorch's) and return the ``CUfunction`` of each of ``names``
    (``extern "C"`` kernels). Compiler errors raise CudaError with NVRTC's log."""
    drv, nv = _bindings("driver"), _bindings("nvrtc")
    _check_driver(drv.cuInit(0), "cuInit")
    dev = _check_driver(drv.cuDeviceGet(device), "cuDeviceGet")
    if int(_check_driver(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")) == 0:
        ctx = _check_driver(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        _check_driver(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    attr = drv.CUdevice_attribute
    major = _check_driver(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc")
    minor = _check_driver(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc")

    def nv_check(result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != nv.nvrtcResult.NVRTC_SUCCESS:
            raise CudaError(f"NVRTC {what} failed: {getattr(err, 'name', err)}")
        return values[0] if values else None

    prog = nv_check(nv.nvrtcCreateProgram(source.encode(), b"quantkit_kernels.cu", 0, [], []), "create")
    try:
        opts = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"-std=c++17", b"-lineinfo"]
        opts += [f"-D{k}={v}".encode() for k, v in (defines or {}).items()]
        result = nv.nvrtcCompileProgram(prog, len(opts), opts)
        err = result[0] if isinstance(result, tuple) else result
        if err != nv.nvrtcResult.NVRTC_SUCCESS:
            size = nv_check(nv.nvrtcGetProgramLogSize(prog), "log size")
            log_buf = b" " * size
            nv.nvrtcGetProgramLog(prog, log_buf)
            raise CudaError(f"NVRTC could not compile quantkit's kernels for sm_{major}{minor}:\n"
                            f"{log_buf.decode(errors='replace').strip()}")
        size = nv_check(nv.nvrtcGetCUBINSize(prog), "cubin size")
        cubin = b" " * size
        nv_check(nv.nvrtcGetCUBIN(prog, cubin), "cubin")
    finally:
        nv.nvrtcDestroyProgram(prog)
    module = _check_driver(drv.cuModuleLoadData(cubin), "cuModuleLoadData")
    return [_check_driver(drv.cuModuleGetFunction(module, n.encode()), f"cuModuleGetFunction({n})") for n in names]


def kernel_args(values: Sequence[Any]) -> Any:
    """The ``void**`` array ``launch`` takes, pointing at ctypes ``values`` (which the caller
    keeps alive, and may change between launches)."""
    import ctypes

    return (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])


def launch(function: Any, grid: int, block: int, args: Any, stream: int, shared_bytes: int = 0) -> None:
    """Launch ``function`` on ``stream`` (an integer handle, e.g. PyTorch's
    ``current_stream().cuda_stream``) with ``args``, a ctypes array of ``void*`` pointing at the
    argument values (kept by the caller; CUDA copies the values at launch)."""
    import ctypes

    drv = _bindings("driver")
    _check_driver(drv.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, shared_bytes, drv.CUstream(stream),
                                     ctypes.addressof(args), 0), "cuLaunchKernel")
