"""TEMPORARY development stub: replaced by the real module (must not be committed as is)."""
def sparse_atten_func(*a, **k):
    raise NotImplementedError("sparse_atten_func: not written yet")

