"""One-pass |x| histogram for CUDA tensors, with Triton when it is installed.

torch.histc needs its range as Python numbers (a host synchronisation) or a pre-scaled copy of
|x|, and its atomic adds serialise on crowded bins; with the zero count that keeps ReLU zeros
out of it, the statistics took ~5 ms of GPU time per ResNet-18 forward at batch 64 (four
passes over every activation). This kernel reads each value once: |x| * scale, floor, clamp to
the last bin; exact zeros are summed per program and added once; every other value is one
atomic add into one of ``SLABS`` private copies of the histogram (spreading crowded bins over
many addresses), which are summed afterwards. The scale is read from device memory, so nothing
waits for the host and the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

BLOCK = 4096
SLABS = 64
_STATE: dict[str, Any] = {}


def _kernel() -> Any:
    if "kernel" not in _STATE:
        import triton
        import triton.language as tl

        @triton.jit
        def abs_histogram(x_ptr, n_elements, scale_ptr, slabs_ptr, NUM_BINS: tl.constexpr, BLOCK: tl.constexpr,
                          SLABS: tl.constexpr):
            pid = tl.program_id(0)
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n_elements
            x = tl.load(x_ptr + offs, mask=inside, other=0.0)
            a = tl.abs(x) * tl.load(scale_ptr)
            idx = tl.minimum(a.to(tl.int32), NUM_BINS - 1)
            slab = slabs_ptr + (pid % SLABS) * NUM_BINS
            counted = inside & (x != 0.0) & (a == a) & (idx >= 0)  # NaN is flagged elsewhere
            tl.atomic_add(slab + idx, tl.full([BLOCK], 1, tl.int32), mask=counted)
            zeros = tl.sum((inside & (x == 0.0)).to(tl.int32), axis=0)
            tl.atomic_add(slab, zeros)

        _STATE["kernel"] = (abs_histogram, triton)
    return _STATE["kernel"]


def add_abs_histogram(x: Any, scale: Any, slabs: Any) -> bool:
    """Add floor(|x| * scale) (last bin closed) to ``slabs`` (int32 [SLABS, bins], CUDA).
    Returns False, doing nothing, when Triton is missing or the kernel cannot be built."""
    if _STATE.get("failed"):
        return False
    try:
        kernel, triton = _kernel()
        n = x.numel()
        kernel[(triton.cdiv(n, BLOCK),)](x, n, scale, slabs, NUM_BINS=slabs.shape[1], BLOCK=BLOCK, SLABS=SLABS,
                                        num_warps=8)
        return True
    except Exception as err:  # noqa: BLE001 - no Triton, or it cannot compile here: use torch.histc
        _STATE["failed"] = True
        log.info("fused histogram kernel unavailable (%s: %s); using torch.histc", type(err).__name__, err)
        return False
