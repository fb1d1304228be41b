"""GAE on CUDA tensors with a cupy RawKernel: one thread per row, a reverse scan.

The same recursion as the numba kernel in :mod:`fusedrl.kernels.gae` (Schulman et al.
2016, eq. 11 and 16)::

    delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma*lam * A_{t+1}

A row is a sequential dependence chain of length T, so the kernel runs B threads that
each walk their row backwards; rows are independent. Reads and writes are strided by T
across threads of a warp, which is fine for RLHF shapes (B in the hundreds to thousands,
T up to a few thousand): the work is O(B*T) and bounded by the one pass over memory.
Tensors are shared with cupy through DLPack (no copy); the kernel runs on the current
torch CUDA stream.

``cupy`` is imported lazily: importing this module never needs a GPU.
"""

from __future__ import annotations

import functools

import torch

_SOURCE = r"""
template <typename T>
__device__ void gae_row(const T* r, const T* v, const bool* m, T gamma, T lam,
                        T* adv, T* ret, long long cols) {
    T last = 0, next_value = 0;
    for (long long t = cols - 1; t >= 0; --t) {
        if (!m[t]) { adv[t] = 0; ret[t] = 0; last = 0; next_value = 0; continue; }
        T delta = r[t] + gamma * next_value - v[t];
        last = delta + gamma * lam * last;
        adv[t] = last;
        ret[t] = last + v[t];
        next_value = v[t];
    }
}

extern "C" __global__ void gae_f32(const float* r, const float* v, const bool* m,
                                   float gamma, float lam, float* adv, float* ret,
                                   long long rows, long long cols) {
    long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= rows) return;
    long long o = b * cols;
    gae_row<float>(r + o, v + o, m + o, gamma, lam, adv + o, ret + o, cols);
}

extern "C" __global__ void gae_f64(const double* r, const double* v, const bool* m,
                                   double gamma, double lam, double* adv, double* ret,
                                   long long rows, long long cols) {
    long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= rows) return;
    long long o = b * cols;
    gae_row<double>(r + o, v + o, m + o, gamma, lam, adv + o, ret + o, cols);
}
"""

_THREADS = 128


def have_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a cupy build that cannot find its CUDA libraries
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernels():
    import cupy

    module = cupy.RawModule(code=_SOURCE, options=("-std=c++14",))
    return {torch.float32: module.get_function("gae_f32"),
            torch.float64: module.get_function("gae_f64")}


def gae_cupy(rewards: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
             gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend ``"cupy"`` of :func:`fusedrl.kernels.gae.compute_gae` (CUDA tensors)."""
    if rewards.device.type != "cuda":
        raise ValueError(f"compute_gae: backend='cupy' needs CUDA tensors, got {rewards.device}")
    if not have_cupy():
        raise ValueError("compute_gae: backend='cupy' requested but cupy is not installed "
                         "(pip install 'fusedrl[gpu]')")
    import cupy
    import numpy as np

    kernel = _kernels()[rewards.dtype]
    r, v = rewards.contiguous(), values.contiguous()
    m = valid.contiguous()
    adv, ret = torch.empty_like(r), torch.empty_like(r)
    rows, cols = r.shape
    scalar = np.float32 if r.dtype == torch.float32 else np.float64
    with cupy.cuda.Device(r.device.index), \
            cupy.cuda.ExternalStream(torch.cuda.current_stream(r.device).cuda_stream):
        args = [cupy.from_dlpack(t) for t in (r, v, m)]
        out = [cupy.from_dlpack(t) for t in (adv, ret)]
        kernel(((rows + _THREADS - 1) // _THREADS,), (_THREADS,),
               (*args, scalar(gamma), scalar(lam), *out, np.int64(rows), np.int64(cols)))
    return adv, ret


__all__ = ["gae_cupy", "have_cupy"]
