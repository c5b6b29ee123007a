// Native top-k block selection from block scores (API.md §6.3 / §11.3).
#pragma once

#include <torch/all.h>

// score: fp32 [H, B, NB] (any strides), seq_lens: int32 [B], topk_idx: int32 [H, B, topk] contiguous (written).
// For each row (h, b): n = min(ceil(max(seq_lens[b], 0) / block_size), NB); candidates are blocks j < n whose
// score is neither -inf nor NaN; they are ranked by (score desc, j asc); the first min(topk, #candidates) ids are
// written, then -1. 1 <= topk <= 64, block_size >= 1.
void msa_topk_from_scores(const at::Tensor& score, const at::Tensor& seq_lens, int64_t block_size, int64_t topk,
                          at::Tensor& topk_idx);

// Same, with the last min(force_local_blocks, n) valid blocks [n - m, n) always selected (whatever their score)
// and ranked first in ascending id, followed by the best remaining candidates. force_local_blocks >= 0.
void msa_topk_from_scores_forced(const at::Tensor& score, const at::Tensor& seq_lens, int64_t block_size,
                                 int64_t topk, int64_t force_local_blocks, at::Tensor& topk_idx);
