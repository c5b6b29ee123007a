// Native top-k block selection from block scores (API.md §6.3 / §11.3).
//
// One CTA per (h, b) row. Every block j of the row gets a distinct 64-bit key
//   key = order_preserving_u32(score) << 32 | (idmask - j) << idshift
// so that a larger key means (higher score, then lower id). Invalid blocks (j >= n, -inf, NaN) get key 0;
// forced local blocks get the high word 0xFFFFFFFF (above +inf), so they rank first, ascending in id.
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

#include <torch/all.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>

#include "topk_from_scores.h"

namespace {

constexpr int kCap = 256;           // candidates kept for the final ranking
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ uint64_t make_key(float x, int j, int n, int f_lo, uint32_t idmask, int idshift) {
  if (j >= n) return 0ull;
  const uint32_t lo = (idmask - static_cast<uint32_t>(j)) << idshift;
  if (j >= f_lo) return (0xffffffffull << 32) | lo;  // forced local block
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
                        int B, int NB, int64_t block_size, int topk, int force, int G, uint32_t idmask,
                        int idshift) {
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

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t row = blockIdx.x;
  const int b = static_cast<int>(row % B);
  const float* srow = score + row * static_cast<int64_t>(NB);
  int* orow = out + row * static_cast<int64_t>(topk);

  int64_t sl = seq_lens[b];
  if (sl < 0) sl = 0;
  const int64_t nblk = sl / block_size + (sl % block_size != 0 ? 1 : 0);
  const int n = nblk < NB ? static_cast<int>(nblk) : NB;
  const int f_lo = force > 0 ? (n > force ? n - force : 0) : n;

  constexpr int NK = ITEMS > 0 ? ITEMS : 1;
  uint64_t keys[NK];
  if constexpr (ITEMS > 0) {
    float xs[NK];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int j = i * THREADS + tid;
      xs[i] = j < n ? __ldg(srow + j) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) keys[i] = make_key(xs[i], i * THREADS + tid, n, f_lo, idmask, idshift);
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
        f(make_key(x, j, n, f_lo, idmask, idshift));
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
void launch(const float* score, const int* seq_lens, int* out, int64_t rows, int B, int NB, int64_t block_size,
            int topk, int force, int G, uint32_t idmask, int idshift, cudaStream_t stream) {
  topk_from_scores_kernel<THREADS, ITEMS><<<static_cast<unsigned>(rows), THREADS, 0, stream>>>(
      score, seq_lens, out, B, NB, block_size, topk, force, G, idmask, idshift);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void topk_impl(const at::Tensor& score, const at::Tensor& seq_lens, int64_t block_size, int64_t topk,
               int64_t force_local_blocks, at::Tensor& topk_idx) {
  TORCH_CHECK(score.is_cuda(), "msa_topk_from_scores: score must be a CUDA tensor");
  TORCH_CHECK(score.scalar_type() == at::kFloat, "msa_topk_from_scores: score must be float32");
  TORCH_CHECK(score.dim() == 3, "msa_topk_from_scores: score must be 3-D [H, B, NB]");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, "msa_topk_from_scores: seq_lens must be int32");
  TORCH_CHECK(topk_idx.scalar_type() == at::kInt, "msa_topk_from_scores: topk_idx must be int32");
  TORCH_CHECK(seq_lens.device() == score.device() && topk_idx.device() == score.device(),
              "msa_topk_from_scores: score, seq_lens and topk_idx must be on the same device");
  const int64_t H = score.size(0), B = score.size(1), NB = score.size(2);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, "msa_topk_from_scores: seq_lens must have shape [B]");
  TORCH_CHECK(topk >= 1 && topk <= 64, "msa_topk_from_scores: topk must be in [1, 64], got ", topk);
  TORCH_CHECK(block_size >= 1, "msa_topk_from_scores: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(force_local_blocks >= 0, "msa_topk_from_scores: force_local_blocks must be >= 0");
  TORCH_CHECK(topk_idx.dim() == 3 && topk_idx.size(0) == H && topk_idx.size(1) == B && topk_idx.size(2) == topk,
              "msa_topk_from_scores: topk_idx must have shape [H, B, topk]");
  TORCH_CHECK(topk_idx.is_contiguous(), "msa_topk_from_scores: topk_idx must be contiguous");
  TORCH_CHECK(NB <= std::numeric_limits<int32_t>::max() / 2, "msa_topk_from_scores: too many blocks");
  const int64_t rows = H * B;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "msa_topk_from_scores: too many rows");
  if (rows == 0) return;

  const c10::cuda::CUDAGuard guard(score.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(score.device().index());
  const at::Tensor s = score.is_contiguous() ? score : score.contiguous();
  const at::Tensor sl = seq_lens.is_contiguous() ? seq_lens : seq_lens.contiguous();

  const int nb = static_cast<int>(NB);
  int idbits = 1;
  while (idbits < 31 && (int64_t{1} << idbits) < NB) ++idbits;
  const uint32_t idmask = static_cast<uint32_t>((uint64_t{1} << idbits) - 1u);
  const int idshift = 32 - idbits;
  const int k = static_cast<int>(topk);
  const int G = k <= 8 ? 32 : (k <= 16 ? 64 : 128);
  const int force = force_local_blocks > NB ? static_cast<int>(NB) + 1 : static_cast<int>(force_local_blocks);
  const float* sp = s.data_ptr<float>();
  const int* lp = sl.data_ptr<int>();
  int* op = topk_idx.data_ptr<int>();
  const int b = static_cast<int>(B);

#define MSA_TOPK_LAUNCH(T, I) launch<T, I>(sp, lp, op, rows, b, nb, block_size, k, force, G, idmask, idshift, stream)
  if (NB <= 128) {
    MSA_TOPK_LAUNCH(128, 1);
  } else if (NB <= 256) {
    MSA_TOPK_LAUNCH(128, 2);
  } else if (NB <= 512) {
    MSA_TOPK_LAUNCH(128, 4);
  } else if (NB <= 1024) {
    MSA_TOPK_LAUNCH(256, 4);
  } else if (NB <= 2048) {
    MSA_TOPK_LAUNCH(256, 8);
  } else if (NB <= 4096) {
    MSA_TOPK_LAUNCH(512, 8);
  } else if (NB <= 8192) {
    MSA_TOPK_LAUNCH(512, 16);
  } else if (NB <= 16384) {
    MSA_TOPK_LAUNCH(1024, 16);
  } else {
    MSA_TOPK_LAUNCH(1024, 0);
  }
#undef MSA_TOPK_LAUNCH
}

}  // namespace

void msa_topk_from_scores(const at::Tensor& score, const at::Tensor& seq_lens, int64_t block_size, int64_t topk,
                          at::Tensor& topk_idx) {
  topk_impl(score, seq_lens, block_size, topk, 0, topk_idx);
}

void msa_topk_from_scores_forced(const at::Tensor& score, const at::Tensor& seq_lens, int64_t block_size,
                                 int64_t topk, int64_t force_local_blocks, at::Tensor& topk_idx) {
  topk_impl(score, seq_lens, block_size, topk, force_local_blocks, topk_idx);
}
