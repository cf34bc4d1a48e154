"""One read per update: the |x| histogram of a CUDA tensor in a CUDA C kernel (NVRTC, cuda-python).

Each block keeps ``SUB`` private histograms in shared memory (warps share them round-robin, so a
crowded bin is four counters, not one), counts exact zeros in registers (half of a ReLU output
would serialise on bin 0), tracks min, max and NaN, and adds its non-zero bins to a global
``pending`` histogram once, at the end. Values are binned with the range of the *previous*
updates; a value beyond it is only counted as an overflow, and one exactly at it as an "edge".
The last block to finish (a ticket counter) then does what needs the whole tensor: the block
minima and maxima, the NaN flag, the range growth by a power of two ``2**k`` with the exact
re-binning of the counts (old bin ``i`` -> ``i >> k``: binning with the old scale and shifting
equals binning with the new one, since the scales differ by a power of two; edges go to bin
``NB >> k``, or the last bin when the range stays), and the new scale. A second kernel bins the
overflow values with the new scale; every one of its blocks returns at once when there were
none, the usual case once the first batches have set the range. So a tensor costs one read and
two launches, and nothing waits for the host: the launches run on PyTorch's current stream and
are captured into CUDA graphs like any other kernel.

The tensor is read from its end backwards: the operation that produced it has just written its
end, which is still in L2, and the layer that reads it next starts at its beginning, which the
pass leaves in L2. Small tensors are spread over more blocks (fewer than 8192 values a block),
so that they too fill the GPU. Warp-aggregated shared adds, other block sizes and fewer shared
copies were slower (figures: benchmarks/results/design_notes.md).

Same statistics as ``quantkit.calibrators.HistogramCollector`` and the torch fallback of
``quantkit.qat.histogram``: ``NB`` bins over [0, range), the value at the range in the last
bin, zeros in bin 0.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

THREADS = 1024  # two blocks per SM
SUB = 4  # shared-memory copies per block: SUB * NB * 4 bytes (32 KiB at 2048 bins)
GRID_PER_SM = 2
UNROLL = 2  # float4 loads issued before their values are binned
MIN_PER_BLOCK = 1 << 13  # values per block before another block is added (up to GRID_PER_SM per SM)

SOURCE = r"""
static_assert(SUB >= 2, "the last block re-uses the SUB histograms as NB doubles");
#define INF __int_as_float(0x7f800000)

// the bin of an overflow value under the new range (-1: binned by the pass, zero or NaN)
__device__ __forceinline__ int rebin(float v, bool had, float old_scale, float scale) {
    if (v != v || v == 0.f) return -1;
    float a = fabsf(v);
    if (had && a * old_scale <= (float)NB) return -1;
    a *= scale;
    return a < (float)NB ? (int)a : NB - 1;
}

__device__ __forceinline__ void add_bin(unsigned* my, int bin) {
    if (bin >= 0) atomicAdd(my + bin, 1u);
}

struct Stats {  // one thread's, one block's or the whole tensor's
    float lo, hi;
    unsigned zeros, edge, over;
    int nan;
};

__device__ __forceinline__ Stats combine(Stats a, const Stats& b) {
    a.lo = fminf(a.lo, b.lo); a.hi = fmaxf(a.hi, b.hi);
    a.zeros += b.zeros; a.edge += b.edge; a.over += b.over; a.nan |= b.nan;
    return a;
}

// the bin of v in this pass, or -1: NaN, zero, or at or beyond the range (counted, not binned;
// a value exactly at the range is an "edge": its bin depends on whether the range grows)
__device__ __forceinline__ int visit(float v, bool have, float scale, Stats& t) {
    if (v != v) { t.nan = 1; return -1; }
    t.lo = fminf(t.lo, v);
    t.hi = fmaxf(t.hi, v);
    if (v == 0.f) { ++t.zeros; return -1; }
    const float a = fabsf(v) * scale;
    if (have && a < (float)NB) return (int)a;
    if (have && a == (float)NB) ++t.edge; else ++t.over;
    return -1;
}

// the block's total, valid in thread 0 (s: 32 Stats of shared memory)
__device__ Stats block_total(Stats t, Stats* s) {
    for (int o = 16; o; o >>= 1) {
        Stats u;
        u.lo = __shfl_xor_sync(0xffffffffu, t.lo, o); u.hi = __shfl_xor_sync(0xffffffffu, t.hi, o);
        u.zeros = __shfl_xor_sync(0xffffffffu, t.zeros, o); u.edge = __shfl_xor_sync(0xffffffffu, t.edge, o);
        u.over = __shfl_xor_sync(0xffffffffu, t.over, o); u.nan = __shfl_xor_sync(0xffffffffu, t.nan, o);
        t = combine(t, u);
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = t;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) t = combine(t, s[w]);
    return t;
}

__device__ __forceinline__ void flush(unsigned (*h)[NB], unsigned* pending) {
    __syncthreads();
    for (int j = threadIdx.x; j < NB; j += blockDim.x) {
        unsigned s = 0;
        #pragma unroll
        for (int k = 0; k < SUB; ++k) s += h[k][j];
        if (s) atomicAdd(pending + j, s);
    }
}

// f: range, scale, min, max, previous range, previous scale;  ist: NaN flag, ticket, rescan flag;
// counts: double[NB];  pending: unsigned[NB];  partial: one Stats per block
extern "C" __global__ void __launch_bounds__(THREADS, 2048 / THREADS)
qk_hist_pass(const float* __restrict__ x, long long n, float* f, int* ist, double* counts, unsigned* pending,
             Stats* partial) {
    __shared__ __align__(16) unsigned h[SUB][NB];  // re-used by the last block as double[NB]
    __shared__ Stats s_warps[32];
    __shared__ bool last;
    __shared__ int s_shift;
    __shared__ Stats s_total;
    for (int j = threadIdx.x; j < SUB * NB; j += blockDim.x) (&h[0][0])[j] = 0u;
    __syncthreads();
    const float range = f[0], scale = f[1];
    const bool have = range > 0.f;
    unsigned* my = h[(threadIdx.x >> 5) % SUB];
    Stats t = {INF, -INF, 0u, 0u, 0u, 0};
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long n4 = n >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride * UNROLL) {
        float4 v[UNROLL];
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (i + u * stride < n4) v[u] = __ldg(x4 + (n4 - 1 - (i + u * stride)));  // from the end
        #pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (i + u * stride >= n4) break;
            add_bin(my, visit(v[u].x, have, scale, t));
            add_bin(my, visit(v[u].y, have, scale, t));
            add_bin(my, visit(v[u].z, have, scale, t));
            add_bin(my, visit(v[u].w, have, scale, t));
        }
    }
    for (long long i = (n4 << 2) + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        add_bin(my, visit(x[i], have, scale, t));
    t = block_total(t, s_warps);
    flush(h, pending);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = t;
        __threadfence();
        last = atomicAdd(ist + 1, 1) == (int)gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;

    // the last block: the tensor's totals, the range growth, the exact re-binning, the new scale
    __threadfence();
    t = Stats{INF, -INF, 0u, 0u, 0u, 0};
    for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
        Stats p;
        p.lo = __ldcg(&partial[b].lo); p.hi = __ldcg(&partial[b].hi); p.zeros = __ldcg(&partial[b].zeros);
        p.edge = __ldcg(&partial[b].edge); p.over = __ldcg(&partial[b].over); p.nan = __ldcg(&partial[b].nan);
        t = combine(t, p);
    }
    t = block_total(t, s_warps);
    if (threadIdx.x == 0) {
        const bool finite = !t.nan && isfinite(t.lo) && isfinite(t.hi);
        if (!finite) ist[0] = 1;
        if (t.lo < f[2]) f[2] = t.lo;
        if (t.hi > f[3]) f[3] = t.hi;
        const float amax = finite ? fmaxf(-t.lo, t.hi) : 0.f;
        const bool first = range == 0.f;
        const float base = first ? amax : range;
        const float k = ceilf(log2f(fmaxf(amax / fmaxf(base, 1e-30f), 1.f)));
        const float new_range = base * exp2f(k);
        s_shift = first ? 0 : min((int)k, 31);
        f[4] = range; f[5] = scale;
        f[0] = new_range;
        f[1] = (float)NB / (new_range > 0.f ? new_range : 1.f);
        ist[2] = t.over > 0u;
        ist[1] = 0;  // the ticket counter, for the next update
        s_total = t;
    }
    __syncthreads();
    const int shift = s_shift;
    // exact zeros stay in bin 0; values exactly at the old range go to its bin in the new one
    const double zeros = (double)s_total.zeros, edge = (double)s_total.edge;
    const int edge_bin = shift ? (NB >> shift) : NB - 1;
    if (shift == 0) {  // the range did not grow: this update's counts are added in place
        for (int j = threadIdx.x; j < NB; j += blockDim.x) {
            counts[j] += (double)__ldcg(pending + j) + (j == 0 ? zeros : 0.0) + (j == edge_bin ? edge : 0.0);
            pending[j] = 0u;
        }
        return;
    }
    double* s_counts = reinterpret_cast<double*>(&h[0][0]);
    for (int j = threadIdx.x; j < NB; j += blockDim.x) s_counts[j] = 0.0;
    __syncthreads();
    for (int j = threadIdx.x; j < NB; j += blockDim.x) {
        const double c = counts[j] + (double)__ldcg(pending + j);
        pending[j] = 0u;
        if (c != 0.0) atomicAdd(s_counts + (j >> shift), c);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < NB; j += blockDim.x)
        counts[j] = s_counts[j] + (j == 0 ? zeros : 0.0) + (j == edge_bin ? edge : 0.0);
}

extern "C" __global__ void __launch_bounds__(THREADS)
qk_hist_rescan(const float* __restrict__ x, long long n, const float* f, const int* ist, unsigned* pending) {
    if (ist[2] == 0) return;
    __shared__ __align__(16) unsigned h[SUB][NB];
    for (int j = threadIdx.x; j < SUB * NB; j += blockDim.x) (&h[0][0])[j] = 0u;
    __syncthreads();
    const float scale = f[1], old_scale = f[5];
    const bool had = f[4] > 0.f;
    unsigned* my = h[(threadIdx.x >> 5) % SUB];
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long n4 = n >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) {
        float4 v = __ldcs(x4 + i);
        add_bin(my, rebin(v.x, had, old_scale, scale));
        add_bin(my, rebin(v.y, had, old_scale, scale));
        add_bin(my, rebin(v.z, had, old_scale, scale));
        add_bin(my, rebin(v.w, had, old_scale, scale));
    }
    for (long long i = (n4 << 2) + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        add_bin(my, rebin(x[i], had, old_scale, scale));
    flush(h, pending);
}
"""

_STATE: dict[Any, Any] = {}


def _kernels(device_index: int, num_bins: int) -> Any:
    """The two kernels for this device and bin count, compiled on first use; None (with one
    warning) when cuda-python or NVRTC is missing or compilation fails."""
    key = (device_index, num_bins)
    if key not in _STATE:
        try:
            from quantkit.cuda import compile_kernels

            _STATE[key] = compile_kernels(SOURCE, ["qk_hist_pass", "qk_hist_rescan"], device=device_index,
                                          defines={"NB": num_bins, "SUB": SUB, "THREADS": THREADS, "UNROLL": UNROLL})
        except Exception as err:  # noqa: BLE001 - no cuda-python/NVRTC here: the caller uses torch operations
            _STATE[key] = None
            log.warning("quantkit's CUDA histogram kernel is unavailable (%s: %s); calibrating with torch "
                        "operations, 2-2.5x slower (install cuda-python: pip install 'quantkit[gpu]')",
                        type(err).__name__, err)
    return _STATE[key]


class _Params:
    """The kernel arguments of one histogram as a ctypes ``void**`` array: built once, with only
    the input pointer and length rewritten per call (cheap launches in eager mode)."""

    def __init__(self, h: Any, max_grid: int):
        import torch

        from quantkit.cuda import kernel_args

        self.partial = torch.zeros((max_grid, 6), dtype=torch.int32, device=h.device)  # struct Stats
        self.x = ctypes.c_void_p(0)
        self.n = ctypes.c_longlong(0)
        f, i, counts, pending = (ctypes.c_void_p(t.data_ptr()) for t in (h._f, h._i, h._counts, h._pending))
        partial = ctypes.c_void_p(self.partial.data_ptr())
        self.values = [self.x, self.n, f, i, counts, pending, partial]
        self.pass_args = kernel_args(self.values)
        self.rescan_args = kernel_args([self.x, self.n, f, i, pending])  # qk_hist_rescan(x, n, f, ist, pending)


def cuda_update(h: Any, x: Any) -> bool:
    """The whole ``TorchHistogram.update`` of a contiguous float32 CUDA tensor in two launches.
    Returns False, doing nothing, when the kernels cannot be built here (the caller then uses
    torch operations)."""
    import torch

    from quantkit.cuda import launch

    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    kernels = _kernels(dev, h.num_bins)
    if kernels is None:
        return False
    k_pass, k_rescan = kernels
    if h._params is None:
        h._max_grid = GRID_PER_SM * torch.cuda.get_device_properties(dev).multi_processor_count
        h._params = _Params(h, h._max_grid)
    if x.data_ptr() % 16:
        x = x.clone()  # float4 loads need 16-byte alignment
    n = x.numel()
    grid = max(1, min(h._max_grid, -(-n // MIN_PER_BLOCK)))
    p = h._params
    p.x.value, p.n.value = x.data_ptr(), n
    stream = torch.cuda.current_stream(x.device).cuda_stream
    launch(k_pass, grid, THREADS, p.pass_args, stream)
    # rare work (the range grew): at most one block per SM, so that its usual no-op costs little
    launch(k_rescan, max(1, min(grid, h._max_grid // GRID_PER_SM)), THREADS, p.rescan_args, stream)
    return True
