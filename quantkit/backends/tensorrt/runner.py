"""Run a TensorRT engine behind quantkit's Runner interface (name-based I/O of TensorRT 10).

    feed (host) -> pinned -> device inputs -> set_input_shape / set_tensor_address
      -> execute_async_v3(stream) -> device outputs -> pinned -> dict of arrays

``quantkit compare`` and ``quantkit bench`` take a ``.plan`` through this class exactly as they
take an ``.onnx`` through OrtRunner. ``time_device`` measures what trtexec measures: inputs
already on the device, optional CUDA graph replay, one or several streams.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.backends.base import Runner
from quantkit.errors import ModelError, QuantkitError
from quantkit.onnx.model import TensorSpec


class TrtRunner(Runner):
    """A deserialized engine, one execution context and its stream and buffers.

    Args:
        engine_path: a serialized engine (``.plan``/``.engine``) built by this TensorRT on this GPU.
    """

    backend = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike[str]):
        from quantkit import cuda
        from quantkit.backends.tensorrt.load import load_tensorrt

        load_tensorrt()  # a clear error when TensorRT (not just its stubs) is missing
        import tensorrt as trt

        path = Path(engine_path)
        if not path.is_file():
            raise ModelError(f"engine file {str(path)!r} does not exist")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelError(f"TensorRT cannot load the engine {str(path)!r}",
                             hint="engines load only in the TensorRT version and on the GPU model that built them; rebuild it")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._specs = [
            TensorSpec(n, tuple(d if d >= 0 else "?" for d in _dims(self.engine.get_tensor_shape(n))),
                       np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))))
            for n in self._inputs
        ]
        self._device: dict[str, Any] = {}
        self._host: dict[str, Any] = {}
        self.device = _gpu_name()

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self._specs

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def _buffer(self, pool: dict[str, Any], name: str, nbytes: int, kind: Any) -> Any:
        buf = pool.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.close()
            buf = pool[name] = kind(max(nbytes, 1))
        return buf

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Set input shapes and every tensor address; returns output shapes and dtypes."""
        from quantkit import cuda

        import tensorrt as trt

        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise ModelError(f"input {name!r}: shape {shape} is outside the engine's optimisation profile")
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = self._buffer(self._device, name, int(np.prod(shape)) * dtype.itemsize, cuda.DeviceBuffer)
            self.context.set_tensor_address(name, buf.ptr)
        outputs = {}
        for name in self._outputs:
            shape = _dims(self.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = self._buffer(self._device, name, int(np.prod(shape)) * dtype.itemsize, cuda.DeviceBuffer)
            self.context.set_tensor_address(name, buf.ptr)
            outputs[name] = (shape, dtype)
        return outputs

    def _infer_impl(self, feed: dict[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
        from quantkit import cuda

        outputs = self._bind({n: tuple(a.shape) for n, a in feed.items()})
        for name, arr in feed.items():
            host = self._buffer(self._host, name, arr.nbytes, cuda.PinnedBuffer)
            host.view(arr.dtype, arr.shape)[...] = arr
            self._device[name].copy_from_host(host, self.stream, nbytes=arr.nbytes)
        if not self.context.execute_async_v3(self.stream.ptr):
            raise QuantkitError("TensorRT's execute_async_v3 failed (its log above says why)")
        result = {}
        for name, (shape, dtype) in outputs.items():
            nbytes = int(np.prod(shape)) * dtype.itemsize
            host = self._buffer(self._host, name, nbytes, cuda.PinnedBuffer)
            self._device[name].copy_to_host(host, self.stream, nbytes=nbytes)
            result[name] = (host, shape, dtype)
        self.stream.synchronize()
        return {n: h.view(dt, shp).copy() for n, (h, shp, dt) in result.items()}

    def time_device(self, feed: dict[str, np.ndarray], *, iterations: int, warmup: int = 10,
                    cuda_graph: bool = False, streams: int = 1, duration_s: float | None = None) -> list[float]:
        """Per-iteration latency (ms) with inputs already on the device, as trtexec reports it.

        With ``streams`` > 1, that many contexts run concurrently, each on its own stream; a
        latency is then the time of one round in which every stream runs once.
        """
        from quantkit import cuda

        rt = cuda.cudart()
        self.infer(feed)  # shapes set, buffers made, inputs on the device
        contexts = [(self.context, self.stream)]
        for _ in range(streams - 1):
            ctx = self.engine.create_execution_context()
            shapes = {n: tuple(a.shape) for n, a in feed.items()}
            for name, shape in shapes.items():
                ctx.set_input_shape(name, shape)
            for name, buf in self._device.items():
                ctx.set_tensor_address(name, buf.ptr)  # outputs shared: timing only
            contexts.append((ctx, cuda.Stream()))
        graphs = []
        if cuda_graph:
            for ctx, stream in contexts:
                ctx.execute_async_v3(stream.ptr)  # TensorRT recommends one run before capture
                stream.synchronize()
                cuda.check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
                           "cudaStreamBeginCapture")
                ctx.execute_async_v3(stream.ptr)
                graph = cuda.check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
                graphs.append(cuda.check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"))

        def once() -> None:
            for i, (ctx, stream) in enumerate(contexts):
                if graphs:
                    cuda.check(rt.cudaGraphLaunch(graphs[i], stream.handle), "cudaGraphLaunch")
                elif not ctx.execute_async_v3(stream.ptr):
                    raise QuantkitError("TensorRT's execute_async_v3 failed")
            for _, stream in contexts:
                stream.synchronize()

        for _ in range(warmup):
            once()
        times: list[float] = []
        start = time.perf_counter()
        while True:  # at least `iterations` runs and at least `duration_s` seconds (trtexec)
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1000.0)
            if len(times) >= iterations and (duration_s is None or time.perf_counter() - start >= duration_s):
                break
        for g in graphs:
            rt.cudaGraphExecDestroy(g)
        for _, stream in contexts[1:]:
            stream.close()
        return times

    def close(self) -> None:
        for pool in (self._device, self._host):
            for buf in pool.values():
                buf.close()
            pool.clear()
        self.stream.close()


def _dims(dims: Any) -> tuple[int, ...]:
    """TensorRT Dims -> tuple (Dims supports len() and indexing)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _gpu_name() -> str:
    from quantkit import cuda

    try:
        props = cuda.check(cuda.cudart().cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
        name = props.name
        return name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
    except QuantkitError:
        return "CUDA GPU"
