"""Per-channel weight fake quantization of a CUDA weight in one kernel (NVRTC, cuda-python).

A QAT training step was bound by the host, not the GPU: on the lent H100 the GPU time of a
ResNet-18 QAT step was 1.14x the FP32 step's, its wall time 1.3-1.6x. Per layer and step the
torch-operations path ran six operations forward (max |w| per channel, clamp, divide, per-tensor
fake quantize, multiply) and three backward, each a dispatch from Python. Here one autograd
function launches one kernel forward (a block per output channel: max |w|, then
``clamp(rint(w / s), -128, 127) * s`` with ``s = max(amax, 1e-12) * (1 / 127)``: the float32
operations of the torch path, whose division by a scalar multiplies by the reciprocal on CUDA,
so the same values) and no kernel backward: with the scale taken
from max |w| no weight lies outside the range, so the straight-through gradient is the identity.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

SOURCE = r"""
extern "C" __global__ void __launch_bounds__(256)
qk_fq_weight(const float* __restrict__ w, float* __restrict__ out, long long per_channel) {
    const float* src = w + (long long)blockIdx.x * per_channel;
    float* dst = out + (long long)blockIdx.x * per_channel;
    __shared__ float s_max[8];
    float m = 0.f;
    for (long long i = threadIdx.x; i < per_channel; i += blockDim.x) m = fmaxf(m, fabsf(src[i]));
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) s_max[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < (int)(blockDim.x >> 5); ++k) m = fmaxf(m, s_max[k]);
        s_max[0] = m;
    }
    __syncthreads();
    const float s = fmaxf(s_max[0], 1e-12f) * (1.f / 127.f);  // as torch's tensor / 127 on CUDA
    for (long long i = threadIdx.x; i < per_channel; i += blockDim.x)
        dst[i] = fminf(fmaxf(nearbyintf(src[i] / s), -128.f), 127.f) * s;
}
"""

THREADS = 256
_STATE: dict[int, Any] = {}


def _kernel(device_index: int) -> Any:
    if device_index not in _STATE:
        try:
            from quantkit.cuda import compile_kernels

            _STATE[device_index] = compile_kernels(SOURCE, ["qk_fq_weight"], device=device_index)[0]
        except Exception:  # noqa: BLE001 - no cuda-python/NVRTC: the torch path (the histogram module warns)
            _STATE[device_index] = None
    return _STATE[device_index]


class _WeightFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, kernel: Any) -> torch.Tensor:  # type: ignore[override]
        from quantkit.cuda import kernel_args, launch

        out = torch.empty_like(w)
        values = [ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                  ctypes.c_longlong(w.numel() // w.shape[0])]
        launch(kernel, w.shape[0], THREADS, kernel_args(values), torch.cuda.current_stream(w.device).cuda_stream)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None  # straight through: no weight is outside its channel's range


def fake_quantize_weight(w: torch.Tensor) -> torch.Tensor | None:
    """Fake-quantized ``w`` (per channel along axis 0), or None when the kernel does not apply
    (not a contiguous float32 CUDA tensor, or no cuda-python/NVRTC here)."""
    if not (w.is_cuda and w.dtype == torch.float32 and w.is_contiguous() and w.dim() >= 1 and w.numel()):
        return None
    kernel = _kernel(w.device.index if w.device.index is not None else torch.cuda.current_device())
    if kernel is None:
        return None
    return _WeightFakeQuant.apply(w, kernel)
