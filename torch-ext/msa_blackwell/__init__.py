"""msa_blackwell: MiniMax Sparse Attention (MSA) kernels for Hopper and Blackwell GPUs.

A MiniMaxAI/msa-compatible API (see the repository's spec) built on Triton kernels plus a native
CUDA top-k. Load it as users do::

    from kernels import get_kernel
    msa = get_kernel("flashrt/MiniMaxAI-msa-blackwell", version=1, trust_remote_code=True)
"""

# The public names, in this order: the 13 official MiniMaxAI/msa names (upstream order), the direct helpers,
# then the error class and the API-status names. Defined before the submodule imports: status.py derives
# OFFICIAL_MINIMAX_MSA_FUNCTIONS and V1_AVAILABLE_FUNCTIONS from it. Reference: docs/API.md.
__all__ = [
    # official MiniMaxAI/msa names
    "sparse_atten_func",
    "sparse_atten_nvfp4_kv_func",
    "sparse_decode_atten_func",
    "SparseDecodePagedAttentionWrapper",
    "fp4_indexer_block_scores",
    "build_k2q_csr",
    "SparseK2qCsrBuilderSm100",
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
    "decode_block_scores",
    "flash_decode_with_gqa_share_sparse",
    "naive_flash_decode_with_topk_idx",
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

from .errors import MsaUnsupportedError  # noqa: E402
from .topk import has_native_ops, native_topk_from_scores  # noqa: E402
from .decode import (  # noqa: E402
    SparseDecodePagedAttentionWrapper,
    flash_decode_with_gqa_share_sparse,
    sparse_decode_atten_func,
)
from .naive import naive_flash_decode_with_gqa_share_sparse  # noqa: E402
from .utils import get_cu_seqblocks, robust_allocator  # noqa: E402
from .csr import SparseK2qCsrBuilderSm100, build_k2q_csr  # noqa: E402
from .prefill import sparse_atten_func, sparse_atten_nvfp4_kv_func  # noqa: E402
from .nvfp4 import (  # noqa: E402
    Nvfp4QuantizedTensor,
    dequantize_nvfp4_128x4_to_bf16,
    native_nvfp4_dequant_swizzled_to_bf16,
    nvfp4_global_scale_from_amax,
    quantize_bf16_to_nvfp4_128x4,
    quantize_kv_bf16_to_nvfp4_128x4,
    swizzle_nvfp4_scale_to_128x4,
)
from .fp4_indexer import fp4_indexer_block_scores  # noqa: E402
from .indexer import decode_block_scores, flash_decode_with_topk_idx, naive_flash_decode_with_topk_idx  # noqa: E402
from .status import (  # noqa: E402
    OFFICIAL_API_STATUS,
    OFFICIAL_MINIMAX_MSA_FUNCTIONS,
    V1_AVAILABLE_FUNCTIONS,
    available_functions,
    official_api_status,
    official_minimax_msa_functions,
    unsupported_official_functions,
)
from . import testing, tuning  # noqa: E402,F401  (msa.testing: float64 references; msa.tuning: override hook)
