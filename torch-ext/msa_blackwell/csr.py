"""TEMPORARY development stub: replaced by the real module (must not be committed as is)."""
def SparseK2qCsrBuilderSm100(*a, **k):
    raise NotImplementedError("SparseK2qCsrBuilderSm100: not written yet")

def build_k2q_csr(*a, **k):
    raise NotImplementedError("build_k2q_csr: not written yet")

