// Declarations of the native (C++/CUDA) ops of msa_blackwell. Light headers only: no <torch/torch.h>, no pybind11.
#pragma once

#include <torch/library.h>

#include "topk_from_scores.h"

// msa_topk_from_scores (API.md §6.3 / §11.3), schema
//   msa_topk_from_scores(Tensor score, Tensor seq_lens, int block_size, int topk, Tensor! topk_idx) -> ()
// score: fp32 [H, B, NB] (any strides), seq_lens: int32 [B], topk_idx: int32 [H, B, topk] contiguous (written);
// all CUDA tensors on one device, 1 <= topk <= 64, block_size >= 1. Invalid arguments raise RuntimeError
// (TORCH_CHECK, host code) before anything is launched.
void msa_topk_from_scores(const at::Tensor& score, const at::Tensor& seq_lens, int64_t block_size, int64_t topk,
                          at::Tensor& topk_idx);

// msa_topk_from_scores_forced, schema
//   msa_topk_from_scores_forced(Tensor score, Tensor seq_lens, int block_size, int topk, int force_init_blocks,
//                               int force_local_blocks, Tensor! topk_idx) -> ()
// Same, with forced blocks selected whatever their score and ranked first: the init blocks
// j < min(force_init_blocks, n) that are not local, ascending id, then the last min(force_local_blocks, n) valid
// blocks [n - m, n), ascending id; then the candidates by (score desc, id asc). force_*_blocks >= 0.
void msa_topk_from_scores_forced(const at::Tensor& score, const at::Tensor& seq_lens, int64_t block_size,
                                 int64_t topk, int64_t force_init_blocks, int64_t force_local_blocks,
                                 at::Tensor& topk_idx);
