// Native top-k block selection from block scores (API.md §6.3 / §11.3).
//
// One CTA per (h, b) row. Every block j of the row gets a distinct 64-bit key
//   key = order_preserving_u32(score) << 32 | (idmask - j) << idshift
// so that a larger key means (higher score, then lower id). Invalid blocks (j >= n, -inf, NaN) get key 0;
// forced init blocks get the high word 0xFFFFFFFF and forced local blocks 0xFFFFFFFE (both above +inf, which
// maps to 0xFF800000), so init blocks rank first, then local blocks, each ascending in id, then the scores.
//
// Selection (deterministic, no atomics-order dependence in the result):
//  1. Each thread keeps its ITEMS keys in registers (j = i * THREADS + tid) and takes their max. The CTA is split
//     into G strided groups (G >= topk); the k-th largest group max tau is a lower bound of the k-th largest key
//     (k groups each own a key >= tau), so {key >= tau} holds the answer and, for non-adversarial data, only a
//     few more keys than k.
//  2. Keys >= tau are compacted into shared memory (slot order may vary, the keys are distinct).
//  3. If more than CAP keys survive (adversarial data), a radix select on 8-bit digits narrows the threshold
//     until at most CAP keys remain, and they are compacted again.
//  4. Each surviving key's rank = number of surviving keys above it; rank < topk writes out[rank]. Positions
//     [min(cnt, topk), topk) get -1.
// Rows of any length are supported: for NB > 16384 the keys are recomputed from global memory on each visit.
//
// Host side: `msa_topk_from_scores_launch` (declared in topk_from_scores.h) takes raw pointers and host ints,
// re-checks every scalar it receives and returns a CUDA error code; it never throws and includes no torch
// header. Tensor validation (TORCH_CHECK) lives in torch-ext/torch_binding.cpp, compiled by the host compiler,
// and runs before this launcher is called.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "topk_from_scores.h"

namespace {

constexpr int kCap = 256;           // candidates kept for the final ranking
constexpr unsigned kFull = 0xffffffffu;

// Block j of a row with n valid blocks: local blocks are [f_lo, n), init blocks [0, i_hi) (i_hi <= f_lo).
__device__ __forceinline__ uint64_t make_key(float x, int j, int n, int f_lo, int i_hi, uint32_t idmask,
                                             int idshift) {
  if (j >= n) return 0ull;
  const uint32_t lo = (idmask - static_cast<uint32_t>(j)) << idshift;
  if (j >= f_lo) return (0xfffffffeull << 32) | lo;  // forced local block
  if (j < i_hi) return (0xffffffffull << 32) | lo;   // forced init block (not local)
  uint32_t u = __float_as_uint(x);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u || u == 0xff800000u) return 0ull;  // NaN or -inf: never a candidate
  if (a == 0u) u = 0u;                                    // -0.0 ties with +0.0
  const uint32_t o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(o) << 32) | lo;  // o >= 0x00800000 for every non-NaN, non -inf value
}

__device__ __forceinline__ int key_to_id(uint64_t key, uint32_t idmask, int idshift) {
  return static_cast<int>(idmask - (static_cast<uint32_t>(key) >> idshift));
}

__device__ __forceinline__ uint64_t umax64(uint64_t a, uint64_t b) { return a > b ? a : b; }

// ITEMS > 0: keys cached in registers (NB <= THREADS * ITEMS). ITEMS == 0: keys recomputed from global memory.
template <int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS)
topk_from_scores_kernel(const float* __restrict__ score, const int* __restrict__ seq_lens, int* __restrict__ out,
                        int B, int NB, unsigned block_size, int topk, int init, int force, int G,
                        uint32_t idmask, int idshift) {
  constexpr int W = THREADS / 32;
  __shared__ uint64_t s_gmax[128];
  __shared__ uint64_t s_cand[kCap];
  __shared__ unsigned s_hist[256];
  __shared__ uint64_t s_tau;
  __shared__ uint64_t s_prefix;
  __shared__ int s_cnt;
  __shared__ int s_need;
  __shared__ int s_above;
  __shared__ int s_done;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched with programmatic stream serialization: wait for the preceding kernel (e.g. the block-score
  // kernel) to complete before reading anything it may have written. The launch itself overlapped its tail.
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const unsigned row = blockIdx.x;
  const int b = static_cast<int>(row % static_cast<unsigned>(B));
  const float* srow = score + static_cast<int64_t>(row) * NB;
  int* orow = out + static_cast<int64_t>(row) * topk;

  constexpr int NK = ITEMS > 0 ? ITEMS : 1;
  float xs[NK];
  if constexpr (ITEMS > 0) {
    // Issued before (and independently of) the seq_lens load, so the two memory latencies overlap.
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = i * THREADS + tid;
      xs[i] = j < NB ? __ldg(srow + j) : 0.f;
    }
  }
  const int sl = __ldg(seq_lens + b);
  const unsigned slu = sl > 0 ? static_cast<unsigned>(sl) : 0u;
  const unsigned nblk = slu / block_size + (slu % block_size != 0u ? 1u : 0u);
  const int n = nblk < static_cast<unsigned>(NB) ? static_cast<int>(nblk) : NB;
  const int f_lo = force > 0 ? (n > force ? n - force : 0) : n;
  const int i_hi = init < f_lo ? init : f_lo;  // init >= 0

  uint64_t keys[NK];
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) keys[i] = make_key(xs[i], i * THREADS + tid, n, f_lo, i_hi, idmask, idshift);
  }
  // Calls f(key) for every element of this thread; the trip count is uniform over the CTA (ballots inside f).
  auto visit = [&](auto&& f) {
    if constexpr (ITEMS > 0) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) f(keys[i]);
    } else {
      for (int base = 0; base < NB; base += THREADS) {
        const int j = base + tid;
        const float x = j < n ? __ldg(srow + j) : 0.f;
        f(make_key(x, j, n, f_lo, i_hi, idmask, idshift));
      }
    }
  };

  // ---- 1. group maxima and tau --------------------------------------------------------------------
  uint64_t m = 0;
  visit([&](uint64_t k) { m = umax64(m, k); });
  const int gpw = G / W;  // groups per warp (G >= W always: G >= 32 >= W)
  for (int off = gpw; off < 32; off <<= 1) m = umax64(m, __shfl_xor_sync(kFull, m, off));
  if (lane < gpw) s_gmax[warp * gpw + lane] = m;
  if (tid == 0) {
    s_cnt = 0;
    s_tau = 1ull;  // fewer than topk non-empty groups: every valid key is a candidate
  }
  __syncthreads();
  if (tid < G) {
    const uint64_t v = s_gmax[tid];
    int r = 0;
    for (int c = 0; c < G; ++c) r += s_gmax[c] > v ? 1 : 0;
    if (r == topk - 1 && v != 0ull) s_tau = v;  // valid keys are distinct: at most one writer
  }
  __syncthreads();
  uint64_t thr = s_tau;

  // ---- 2. compaction of keys >= thr ---------------------------------------------------------------
  auto compact = [&](uint64_t t) {
    visit([&](uint64_t k) {
      const bool p = k >= t;
      const unsigned bal = __ballot_sync(kFull, p);
      if (bal != 0u) {
        int base = 0;
        if (lane == 0) base = atomicAdd(&s_cnt, __popc(bal));
        base = __shfl_sync(kFull, base, 0);
        if (p) {
          const int slot = base + __popc(bal & ((1u << lane) - 1u));
          if (slot < kCap) s_cand[slot] = k;
        }
      }
    });
  };
  compact(thr);
  __syncthreads();
  int cnt = s_cnt;

  // ---- 3. rare: radix select down to <= kCap candidates ------------------------------------------
  if (cnt > kCap) {  // CTA-uniform
    const uint64_t tau = thr;
    if (tid == 0) {
      s_prefix = 0ull;
      s_need = topk;
      s_above = 0;
      s_done = 0;
    }
    uint64_t prefix = 0ull;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += THREADS) s_hist[i] = 0u;
      __syncthreads();
      const uint64_t hmask = shift == 56 ? 0ull : (~0ull << (shift + 8));
      visit([&](uint64_t k) {
        if (k >= tau && (k & hmask) == prefix) atomicAdd(&s_hist[(k >> shift) & 255u], 1u);
      });
      __syncthreads();
      if (warp == 0) {
        const int need = s_need;
        unsigned h[8];
        unsigned tot = 0u;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          h[q] = s_hist[lane * 8 + q];
          tot += h[q];
        }
        unsigned suf = tot;  // inclusive suffix sum over lanes >= lane
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned t = __shfl_down_sync(kFull, suf, off);
          if (lane + off < 32) suf += t;
        }
        const unsigned excl = suf - tot;
        if (excl < static_cast<unsigned>(need) && static_cast<unsigned>(need) <= suf) {  // exactly one lane
          unsigned acc = excl;
#pragma unroll
          for (int q = 7; q >= 0; --q) {
            if (acc + h[q] >= static_cast<unsigned>(need)) {
              const int above = s_above + static_cast<int>(acc);
              s_prefix = prefix | (static_cast<uint64_t>(lane * 8 + q) << shift);
              s_need = need - static_cast<int>(acc);
              s_above = above;
              s_done = (above + static_cast<int>(h[q]) <= kCap) ? 1 : 0;
              break;
            }
            acc += h[q];
          }
        }
      }
      __syncthreads();
      prefix = s_prefix;
      if (s_done) break;  // CTA-uniform
    }
    thr = umax64(prefix, tau);
    __syncthreads();
    if (tid == 0) s_cnt = 0;
    __syncthreads();
    compact(thr);
    __syncthreads();
    cnt = s_cnt;
    if (cnt > kCap) cnt = kCap;  // cannot happen (keys are distinct); keeps the reads in bounds
  }

  // ---- 4. rank the candidates and write the row ------------------------------------------------------
  for (int c = tid; c < cnt; c += THREADS) {
    const uint64_t v = s_cand[c];
    int r = 0;
    for (int c2 = 0; c2 < cnt; ++c2) r += s_cand[c2] > v ? 1 : 0;
    if (r < topk) orow[r] = key_to_id(v, idmask, idshift);
  }
  const int nout = cnt < topk ? cnt : topk;
  for (int r = nout + tid; r < topk; r += THREADS) orow[r] = -1;
}

template <int THREADS, int ITEMS>
cudaError_t launch(const float* score, const int* seq_lens, int* out, int64_t rows, int B, int NB,
                   unsigned block_size, int topk, int init, int force, int G, uint32_t idmask, int idshift,
                   cudaStream_t stream) noexcept {
  // Programmatic dependent launch (sm_90+): the CTAs may be scheduled while the previous kernel in the stream
  // drains; the kernel's griddepcontrol.wait keeps every global read after that kernel's completion. Captured
  // into CUDA graphs as a programmatic edge. Devices without it run the launch as a normal one.
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(rows));
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, topk_from_scores_kernel<THREADS, ITEMS>, score, seq_lens, out, B, NB, block_size,
                            topk, init, force, G, idmask, idshift);
}

}  // namespace

int msa_topk_from_scores_launch(const float* score, const int32_t* seq_lens, int32_t* topk_idx, int64_t H,
                                int64_t B, int64_t NB, int64_t block_size, int64_t topk,
                                int64_t force_init_blocks, int64_t force_local_blocks, void* stream) noexcept {
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  // Defence in depth: the binding has validated all of this already; nothing out of range is ever launched.
  if (topk < 1 || topk > kMsaTopkMaxK || block_size < 1 || force_init_blocks < 0 || force_local_blocks < 0) {
    return cudaErrorInvalidValue;
  }
  if (H < 0 || B < 0 || NB < 0 || H > kInt32Max || B > kInt32Max || NB > kInt32Max / 2) {
    return cudaErrorInvalidValue;
  }
  const int64_t rows = H * B;  // < 2^62: no overflow
  if (rows > kInt32Max) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (topk_idx == nullptr || seq_lens == nullptr || (NB > 0 && score == nullptr)) return cudaErrorInvalidValue;

  const int nb = static_cast<int>(NB);
  int idbits = 1;
  while (idbits < 31 && (int64_t{1} << idbits) < NB) ++idbits;
  const uint32_t idmask = static_cast<uint32_t>((uint64_t{1} << idbits) - 1u);
  const int idshift = 32 - idbits;
  const int k = static_cast<int>(topk);
  const int G = k <= 8 ? 32 : (k <= 16 ? 64 : 128);
  const int force = force_local_blocks > NB ? nb + 1 : static_cast<int>(force_local_blocks);
  // Only min(init, f_lo) <= n <= NB init blocks can exist: clamping to NB changes nothing.
  const int init = force_init_blocks > NB ? nb : static_cast<int>(force_init_blocks);
  const int b = static_cast<int>(B);
  // seq_lens are int32, so ceil(seq_len / block_size) is unchanged by clamping block_size to 2^31 - 1.
  const unsigned bsz = static_cast<unsigned>(std::min<int64_t>(block_size, kInt32Max));
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int* lp = seq_lens;
  int* op = topk_idx;

#define MSA_TOPK_LAUNCH(T, I) launch<T, I>(score, lp, op, rows, b, nb, bsz, k, init, force, G, idmask, idshift, st)
  cudaError_t err;
  if (NB <= 128) {
    err = MSA_TOPK_LAUNCH(128, 1);
  } else if (NB <= 256) {
    err = MSA_TOPK_LAUNCH(128, 2);
  } else if (NB <= 512) {
    err = MSA_TOPK_LAUNCH(128, 4);
  } else if (NB <= 1024) {
    err = MSA_TOPK_LAUNCH(256, 4);
  } else if (NB <= 2048) {
    err = MSA_TOPK_LAUNCH(256, 8);
  } else if (NB <= 4096) {
    err = MSA_TOPK_LAUNCH(512, 8);
  } else if (NB <= 8192) {
    err = MSA_TOPK_LAUNCH(512, 16);
  } else if (NB <= 16384) {
    err = MSA_TOPK_LAUNCH(1024, 16);
  } else {
    err = MSA_TOPK_LAUNCH(1024, 0);
  }
#undef MSA_TOPK_LAUNCH
  return static_cast<int>(err);
}

const char* msa_topk_error_string(int err) noexcept {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
