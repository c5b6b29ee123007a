"""msa_blackwell: MiniMax Sparse Attention (MSA) kernels for Hopper and Blackwell GPUs.

A MiniMaxAI/msa-compatible API (see the repository's spec) built on Triton kernels plus a native
CUDA top-k. Load it as users do::

    from kernels import get_kernel
    msa = get_kernel("flashrt/MiniMaxAI-msa-blackwell", version=1, trust_remote_code=True)
"""

from .errors import MsaUnsupportedError
from .topk import has_native_ops, native_topk_from_scores
from .decode import (
    SparseDecodePagedAttentionWrapper,
    flash_decode_with_gqa_share_sparse,
    sparse_decode_atten_func,
)
from .naive import naive_flash_decode_with_gqa_share_sparse
from .utils import get_cu_seqblocks, robust_allocator
from .csr import SparseK2qCsrBuilderSm100, build_k2q_csr
from .prefill import sparse_atten_func
from .nvfp4 import (
    Nvfp4QuantizedTensor,
    dequantize_nvfp4_128x4_to_bf16,
    native_nvfp4_dequant_swizzled_to_bf16,
    nvfp4_global_scale_from_amax,
    quantize_bf16_to_nvfp4_128x4,
    quantize_kv_bf16_to_nvfp4_128x4,
    swizzle_nvfp4_scale_to_128x4,
)
from .fp4_indexer import fp4_indexer_block_scores
from .indexer import flash_decode_with_topk_idx, naive_flash_decode_with_topk_idx
from .nvfp4_attention import sparse_atten_nvfp4_kv_func
from .status import (
    OFFICIAL_API_STATUS,
    OFFICIAL_MINIMAX_MSA_FUNCTIONS,
    V1_AVAILABLE_FUNCTIONS,
    available_functions,
    official_api_status,
    official_minimax_msa_functions,
    unsupported_official_functions,
)

__all__ = [
    # official MiniMaxAI/msa names
    "sparse_atten_func",
    "sparse_atten_nvfp4_kv_func",
    "sparse_decode_atten_func",
    "SparseDecodePagedAttentionWrapper",
    "build_k2q_csr",
    "SparseK2qCsrBuilderSm100",
    "fp4_indexer_block_scores",
    "Nvfp4QuantizedTensor",
    "quantize_bf16_to_nvfp4_128x4",
    "quantize_kv_bf16_to_nvfp4_128x4",
    "dequantize_nvfp4_128x4_to_bf16",
    "swizzle_nvfp4_scale_to_128x4",
    "nvfp4_global_scale_from_amax",
    # direct helpers
    "has_native_ops",
    "native_topk_from_scores",
    "native_nvfp4_dequant_swizzled_to_bf16",
    "flash_decode_with_topk_idx",
    "naive_flash_decode_with_topk_idx",
    "flash_decode_with_gqa_share_sparse",
    "naive_flash_decode_with_gqa_share_sparse",
    "get_cu_seqblocks",
    "robust_allocator",
    # errors and API status
    "MsaUnsupportedError",
    "OFFICIAL_API_STATUS",
    "OFFICIAL_MINIMAX_MSA_FUNCTIONS",
    "V1_AVAILABLE_FUNCTIONS",
    "available_functions",
    "official_api_status",
    "official_minimax_msa_functions",
    "unsupported_official_functions",
]
