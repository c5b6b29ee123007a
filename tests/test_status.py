"""API-status helpers and the exact public surface (docs/API.md §7.2, §8)."""

import types

import pytest

from .helpers import msa

OFFICIAL = ("sparse_atten_func", "sparse_atten_nvfp4_kv_func", "sparse_decode_atten_func",
            "SparseDecodePagedAttentionWrapper", "fp4_indexer_block_scores", "build_k2q_csr",
            "SparseK2qCsrBuilderSm100", "Nvfp4QuantizedTensor", "quantize_bf16_to_nvfp4_128x4",
            "quantize_kv_bf16_to_nvfp4_128x4", "dequantize_nvfp4_128x4_to_bf16", "swizzle_nvfp4_scale_to_128x4",
            "nvfp4_global_scale_from_amax")
DIRECT = ("has_native_ops", "native_topk_from_scores", "native_nvfp4_dequant_swizzled_to_bf16",
          "flash_decode_with_topk_idx", "decode_block_scores", "flash_decode_with_gqa_share_sparse",
          "naive_flash_decode_with_topk_idx", "naive_flash_decode_with_gqa_share_sparse", "get_cu_seqblocks",
          "robust_allocator")
STATUS = ("OFFICIAL_API_STATUS", "OFFICIAL_MINIMAX_MSA_FUNCTIONS", "V1_AVAILABLE_FUNCTIONS", "available_functions",
          "official_api_status", "official_minimax_msa_functions", "unsupported_official_functions")


@pytest.mark.kernels_ci
def test_all_is_exactly_the_spec_surface():
    assert set(msa.__all__) == set(OFFICIAL + DIRECT + STATUS + ("MsaUnsupportedError",))


@pytest.mark.kernels_ci
def test_status_helpers():
    assert msa.OFFICIAL_MINIMAX_MSA_FUNCTIONS == OFFICIAL
    assert msa.official_minimax_msa_functions() == OFFICIAL
    assert msa.V1_AVAILABLE_FUNCTIONS == OFFICIAL + DIRECT
    assert msa.available_functions() == OFFICIAL + DIRECT
    for name in msa.available_functions():
        assert hasattr(msa, name), name
    assert isinstance(msa.OFFICIAL_API_STATUS, types.MappingProxyType)
    with pytest.raises(TypeError):
        msa.OFFICIAL_API_STATUS["x"] = {}
    st = msa.official_api_status()
    assert isinstance(st, dict) and set(st) == set(OFFICIAL)
    for v in st.values():
        assert v["status"] in ("available", "available_optional_te") and v["target"] and v["reason"]
    st["build_k2q_csr"]["status"] = "changed"
    assert msa.official_api_status()["build_k2q_csr"]["status"] == "available"
    assert msa.unsupported_official_functions() == ()
