"""Per-channel weight fake quantization of CUDA weights in one kernel (NVRTC, cuda-python).

A QAT training step was bound by the host, not the GPU: its GPU time was close to the FP32
step's, its wall time well above. Per layer and step the torch-operations path ran six operations forward (max |w| per channel, clamp, divide, per-tensor
fake quantize, multiply) and three backward, each a dispatch from Python. Here one autograd
function launches one kernel forward (a block per output channel: max |w|, then
``clamp(rint(w / s), -128, 127) * s`` with ``s = max(amax, 1e-12) * (1 / 127)``: the float32
operations of the torch path, whose division by a scalar multiplies by the reciprocal on CUDA,
so the same values) and no kernel backward: with the scale taken
from max |w| no weight lies outside the range, so the straight-through gradient is the identity.

``WeightBank`` goes one step further: the weight quantizers of one prepared model share a bank,
and the first of them called after the weights changed (an optimizer step bumps their version
counters) fake-quantizes every weight of the bank in one launch of ``qk_fq_weights`` (a table of
output channels, uploaded when the weights move), under one autograd node with one identity
backward; the other layers of the pass take their result from the bank. So a step costs one
launch and one Python backward instead of one of each per layer; the price is one float32 copy
of the weights, kept between steps, and the weight gradients all leave the one node at the end
of the backward pass. Inside CUDA graph capture the bank steps aside, and each layer launches
its own kernel. The figures (per-layer kernels, the bank, the bank with shared input fake quant)
are in benchmarks/results/design_notes.md.

In a torch.distributed job DistributedDataParallel reduces gradients bucket by bucket while the
backward pass runs, and the bank's one node hands every weight gradient over at its very end.
``segment_bytes`` splits the bank there into segments of about that many bytes of weights, in the
layers' registration (forward) order, each one launch and one autograd node, so that the late
layers' gradients can be reduced while the early layers' backward runs. Measured on two H200s
with NVLink (ResNet-50, benchmarks/results/gpu_distributed.md) one segment was fastest: the
reduction is short there, and overlapping it slowed the backward kernels more than it saved; so
the default is one segment, and segments are for slower links, where the overlap pays.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

SOURCE = r"""
// one output channel of n weights: m = max |w|, then clamp(rint(w / s), -128, 127) * s
__device__ __forceinline__ void fq_channel(const float* __restrict__ src, float* __restrict__ dst, long long n) {
    __shared__ float s_max[8];
    float m = 0.f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, fabsf(src[i]));
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) s_max[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < (int)(blockDim.x >> 5); ++k) m = fmaxf(m, s_max[k]);
        s_max[0] = m;
    }
    __syncthreads();
    const float s = fmaxf(s_max[0], 1e-12f) * (1.f / 127.f);  // as torch's tensor / 127 on CUDA
    for (long long i = threadIdx.x; i < n; i += blockDim.x)
        dst[i] = fminf(fmaxf(nearbyintf(src[i] / s), -128.f), 127.f) * s;
}

// one weight, a block per output channel
extern "C" __global__ void __launch_bounds__(256)
qk_fq_weight(const float* __restrict__ w, float* __restrict__ out, long long per_channel) {
    fq_channel(w + (long long)blockIdx.x * per_channel, out + (long long)blockIdx.x * per_channel, per_channel);
}

// every weight of a model, a block per output channel: the channel's source, its offset in out, its size
struct Channel { const float* src; long long dst; long long n; };
extern "C" __global__ void __launch_bounds__(256)
qk_fq_weights(const Channel* __restrict__ channels, float* __restrict__ out) {
    const Channel c = channels[blockIdx.x];
    fq_channel(c.src, out + c.dst, c.n);
}
"""

THREADS = 256
_STATE: dict[int, Any] = {}


def _kernel(device_index: int) -> Any:
    if device_index not in _STATE:
        try:
            from quantkit.cuda import compile_kernels

            _STATE[device_index] = compile_kernels(SOURCE, ["qk_fq_weight", "qk_fq_weights"], device=device_index)
        except Exception:  # noqa: BLE001 - no cuda-python/NVRTC: the torch path (the histogram module warns)
            _STATE[device_index] = None
    return _STATE[device_index]


def eligible(w: torch.Tensor) -> bool:
    """A weight the kernels take: a contiguous, non-empty float32 CUDA tensor."""
    return bool(w.is_cuda and w.dtype == torch.float32 and w.is_contiguous() and w.dim() >= 1 and w.numel())


class _WeightFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, kernel: Any) -> torch.Tensor:  # type: ignore[override]
        from quantkit.cuda import kernel_args, launch

        out = torch.empty_like(w)
        values = [ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                  ctypes.c_longlong(w.numel() // w.shape[0])]
        launch(kernel[0], w.shape[0], THREADS, kernel_args(values), torch.cuda.current_stream(w.device).cuda_stream)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None  # straight through: no weight is outside its channel's range


def fake_quantize_weight(w: torch.Tensor) -> torch.Tensor | None:
    """Fake-quantized ``w`` (per channel along axis 0), or None when the kernel does not apply
    (not a contiguous float32 CUDA tensor, or no cuda-python/NVRTC here)."""
    if not eligible(w):
        return None
    kernel = _kernel(w.device.index if w.device.index is not None else torch.cuda.current_device())
    if kernel is None:
        return None
    return _WeightFakeQuant.apply(w, kernel)


def _distributed() -> bool:
    """Inside an initialised torch.distributed process group."""
    dist = getattr(torch, "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


class _Segment:
    """Consecutive weights of a bank fake-quantized by one launch: the channel table (source
    pointer, output offset, size) on the device, and the kernel's packed arguments."""

    def __init__(self, ws: list[torch.Tensor], device: torch.device, kernel: Any) -> None:
        import numpy as np

        from quantkit.cuda import kernel_args

        rows, offset = [], 0
        for w in ws:
            channels, per = w.shape[0], w.numel() // w.shape[0]
            c = np.arange(channels, dtype=np.int64)
            rows.append(np.stack([w.data_ptr() + c * per * 4, offset + c * per, np.full(channels, per)], axis=1))
            offset += w.numel()
        table = np.concatenate(rows).astype(np.int64)
        self.size = len(ws)
        self.kernel = kernel
        self.table = torch.from_numpy(table).to(device)
        self.total, self.channels = offset, len(table)
        self.out_ptr = ctypes.c_void_p(0)
        self.table_ptr = ctypes.c_void_p(self.table.data_ptr())  # kept: args points at it
        self.args = kernel_args([self.table_ptr, self.out_ptr])


class _BankFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, seg: _Segment, *ws: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        from quantkit.cuda import launch

        ctx.set_materialize_grads(False)
        flat = torch.empty(seg.total, dtype=torch.float32, device=ws[0].device)
        seg.out_ptr.value = flat.data_ptr()
        launch(seg.kernel, seg.channels, THREADS, seg.args, torch.cuda.current_stream(ws[0].device).cuda_stream)
        return tuple(part.view(w.shape) for part, w in zip(flat.split([w.numel() for w in ws]), ws))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        return (None, *grads)  # straight through, as _WeightFakeQuant


class WeightBank:
    """The per-channel weight quantizers of one model, fake-quantized together (see the module
    docstring). ``add`` registers (quantizer, layer) pairs; ``lookup`` serves one quantizer.

    Args:
        distributed: serve also inside a torch.distributed job; False: step aside there (a
            kernel per layer).
        segment_bytes: in a torch.distributed job, split the bank into segments of about this
            many bytes of weights (None: one segment; see the module docstring).
    """

    def __init__(self, *, distributed: bool = False, segment_bytes: int | None = None) -> None:
        self.distributed = distributed
        self.segment_bytes = segment_bytes
        self.members: list[tuple[Any, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self._outputs: dict[int, tuple[torch.Tensor, int, bool, torch.Tensor]] = {}
        self._key: Any = None
        self.segments_: list[_Segment] = []

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: members only (outputs are autograd results)
        return {"members": self.members, "distributed": self.distributed, "segment_bytes": self.segment_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.members = state["members"]
        self.distributed = state.get("distributed", False)
        self.segment_bytes = state.get("segment_bytes")
        self._reset()

    def add(self, quantizer: Any, layer: Any) -> None:
        self.members.append((quantizer, layer))
        quantizer.bank_ = self

    def lookup(self, quantizer: Any, w: torch.Tensor) -> torch.Tensor | None:
        """``quantizer``'s fake-quantized ``w``, computed with every other weight of the bank
        when the last result is stale; None when the bank cannot serve it (the caller then
        quantizes ``w`` alone)."""
        if torch.cuda.is_current_stream_capturing():
            return None  # a graph must quantize the weights it reads at replay
        grad = torch.is_grad_enabled()
        entry = self._outputs.get(id(quantizer))
        if entry is not None and entry[0] is w and entry[1] == w._version and entry[2] == grad:
            return entry[3]
        distributed = _distributed()
        if not eligible(w) or (distributed and not self.distributed):
            return None
        self._compute(w.device, grad, distributed)
        entry = self._outputs.get(id(quantizer))
        return entry[3] if entry is not None and entry[0] is w else None

    def _compute(self, device: torch.device, grad: bool, distributed: bool) -> None:
        live = []
        for q, layer in self.members:
            w = getattr(layer, "weight", None)
            if (q.enabled and q.dynamic and q.axis == 0 and not q.calibrated and isinstance(w, torch.Tensor)
                    and eligible(w) and w.device == device):
                live.append((q, w))
        if not live:
            return
        ws = [w for _, w in live]
        key = (distributed, *((w.data_ptr(), w.shape) for w in ws))
        if key != self._key and not self._build(ws, device, distributed):
            return
        self._key = key
        start = 0
        with torch.set_grad_enabled(grad):
            for seg in self.segments_:
                outs = _BankFakeQuant.apply(seg, *ws[start:start + seg.size])
                for (q, w), out in zip(live[start:start + seg.size], outs):
                    self._outputs[id(q)] = (w, w._version, grad, out)
                start += seg.size

    def _build(self, ws: list[torch.Tensor], device: torch.device, distributed: bool) -> bool:
        """The segments of ``ws`` on ``device``: one, or with ``segment_bytes`` under
        torch.distributed consecutive runs of about that size."""
        kernels = _kernel(device.index if device.index is not None else torch.cuda.current_device())
        if kernels is None:
            return False
        parts: list[list[torch.Tensor]] = [[]]
        size = 0
        for w in ws:
            if distributed and self.segment_bytes and parts[-1] and size + w.numel() * 4 > self.segment_bytes:
                parts.append([])
                size = 0
            parts[-1].append(w)
            size += w.numel() * 4
        self.segments_ = [_Segment(p, device, kernels[1]) for p in parts]
        self._outputs.clear()
        return True
