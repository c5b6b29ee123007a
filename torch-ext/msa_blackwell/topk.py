"""TEMPORARY development stub: replaced by the real module (must not be committed as is)."""
def has_native_ops(*a, **k):
    raise NotImplementedError("has_native_ops: not written yet")

def native_topk_from_scores(*a, **k):
    raise NotImplementedError("native_topk_from_scores: not written yet")

