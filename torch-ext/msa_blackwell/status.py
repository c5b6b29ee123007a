"""API-status helpers (docs/API.md §7.2): which official MiniMaxAI/msa names this build provides.

The name lists are slices of the package's ``__all__`` (official names first, then the direct helpers, then
``MsaUnsupportedError`` and the names of this module), so there is one list of public names.
"""

import copy
import types

from . import __all__ as _PUBLIC

OFFICIAL_MINIMAX_MSA_FUNCTIONS = tuple(_PUBLIC[:_PUBLIC.index("has_native_ops")])
V1_AVAILABLE_FUNCTIONS = tuple(_PUBLIC[:_PUBLIC.index("MsaUnsupportedError")])

_TARGET = "NVIDIA compute capability 9.0, 10.0, 12.0, 12.1 (Triton + native CUDA top-k)"
_REASONS = {
    "sparse_atten_func": "Triton block-sparse prefill over dense or paged KV (CSR input)",
    "sparse_atten_nvfp4_kv_func": "Triton prefill kernel reading packed NVFP4 K/V + 128x4 scales in its loop (fused, no bf16 K/V)",
    "sparse_decode_atten_func": "Triton split-KV sparse/dense paged decode with fused combine",
    "SparseDecodePagedAttentionWrapper": "plan/run wrapper over the decode kernel; run is CUDA-graph capturable",
    "fp4_indexer_block_scores": "Triton FP4 (nvfp4/mxfp4) block-max scorer",
    "build_k2q_csr": "on-GPU Triton CSR builder (CPU path in PyTorch)",
    "SparseK2qCsrBuilderSm100": "callable alias of build_k2q_csr, runs on every supported GPU",
    "Nvfp4QuantizedTensor": "plain frozen dataclass",
    "quantize_bf16_to_nvfp4_128x4": "own Triton quantiser; Transformer Engine not required",
    "quantize_kv_bf16_to_nvfp4_128x4": "own Triton quantiser; Transformer Engine not required",
    "dequantize_nvfp4_128x4_to_bf16": "PyTorch reference dequantiser (CPU or CUDA)",
    "swizzle_nvfp4_scale_to_128x4": "PyTorch 128x4 scale swizzle (CPU or CUDA)",
    "nvfp4_global_scale_from_amax": "PyTorch, amax / 2688 in FP32",
}

OFFICIAL_API_STATUS = types.MappingProxyType({
    name: types.MappingProxyType({"status": "available", "target": _TARGET, "reason": _REASONS[name]})
    for name in OFFICIAL_MINIMAX_MSA_FUNCTIONS
})


def available_functions() -> tuple:
    """Every public function name of this build (the 13 official names, then the direct helpers)."""
    return V1_AVAILABLE_FUNCTIONS


def official_minimax_msa_functions() -> tuple:
    """The 13 official MiniMaxAI/msa names, in upstream order."""
    return OFFICIAL_MINIMAX_MSA_FUNCTIONS


def official_api_status() -> dict:
    """A fresh ``{name: {"status", "target", "reason"}}`` copy of ``OFFICIAL_API_STATUS``."""
    return {k: copy.deepcopy(dict(v)) for k, v in OFFICIAL_API_STATUS.items()}


def unsupported_official_functions() -> tuple:
    """Official names whose status is neither "available" nor "available_optional_te" (empty here)."""
    return tuple(k for k, v in OFFICIAL_API_STATUS.items()
                 if v["status"] not in ("available", "available_optional_te"))
