// Native top-k block selection from block scores (API.md §6.3 / §11.3): the CUDA launcher.
//
// This header is shared by the kernel (csrc/topk_from_scores.cu, nvcc) and the torch binding
// (torch-ext/torch_binding.cpp, host compiler). It has no torch include: the launcher takes raw device
// pointers and host ints, never throws, and reports errors as a CUDA error code. All tensor validation
// (TORCH_CHECK -> RuntimeError) is done by the binding, in host-compiled code, before the launcher is called.
#pragma once

#include <cstdint>

// Largest supported topk (per-row output width).
constexpr int64_t kMsaTopkMaxK = 64;

// For each row (h, b) of score [H, B, NB]: n = min(ceil(max(seq_lens[b], 0) / block_size), NB); candidates are
// blocks j < n whose score is neither -inf nor NaN. Selection order:
//   1. forced init blocks: j < min(force_init_blocks, n) that are not also local, ascending id;
//   2. forced local blocks: the last min(force_local_blocks, n) valid blocks [n - m, n), ascending id;
//   3. the remaining candidates ranked by (score desc, j asc).
// Forced blocks are selected whatever their score. The first min(topk, #selected) ids are written to
// topk_idx[h, b, :], then -1.
//
//   score:    device pointer, fp32 [H, B, NB], contiguous (may be null when NB == 0)
//   seq_lens: device pointer, int32 [B]
//   topk_idx: device pointer, int32 [H, B, topk], contiguous (written)
//   stream:   the cudaStream_t to launch on (the current torch stream of the tensors' device, already current)
//
// Requirements (checked again here; a violation returns cudaErrorInvalidValue and launches nothing):
// 1 <= topk <= 64, block_size >= 1, force_init_blocks >= 0, force_local_blocks >= 0, 0 <= H, B <= 2^31 - 1,
// 0 <= NB <= 2^30 - 1, H * B <= 2^31 - 1. Returns 0 (cudaSuccess) when the launch was issued (or there was
// nothing to do).
int msa_topk_from_scores_launch(const float* score, const int32_t* seq_lens, int32_t* topk_idx, int64_t H,
                                int64_t B, int64_t NB, int64_t block_size, int64_t topk,
                                int64_t force_init_blocks, int64_t force_local_blocks, void* stream) noexcept;

// cudaGetErrorString of a code returned by msa_topk_from_scores_launch.
const char* msa_topk_error_string(int err) noexcept;
