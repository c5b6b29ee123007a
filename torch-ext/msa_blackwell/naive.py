"""TEMPORARY development stub: replaced by the real module (must not be committed as is)."""
def naive_flash_decode_with_gqa_share_sparse(*a, **k):
    raise NotImplementedError("naive_flash_decode_with_gqa_share_sparse: not written yet")

