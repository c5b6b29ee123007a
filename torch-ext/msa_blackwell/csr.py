"""``build_k2q_csr`` / ``SparseK2qCsrBuilderSm100`` (docs/API.md §5.3, §5.4) and ``k2q_to_q2k``: API and custom ops.

``build_k2q_csr`` turns per-token block ids ``q2k_indices [Hkv, total_q, topK]`` into the KV-major CSR
``(k2q_row_ptr int32 [Hkv, T+1], k2q_q_indices int32 [Hkv, total_q*topK])`` of docs/API.md §5.3: requests get
``R_b = ceil(Lk_b / 128)`` rows numbered level-major, row ``r`` lists the batch-local query indices that
selected it (ascending, duplicates kept), then a ``-1`` tail. CUDA tensors run the Triton kernels of
``csr_kernel`` (no host synchronisation); CPU tensors run its PyTorch path (identical results). Tokens belong
to requests by the owner rule of docs/API.md §12.1, so every ``cu_seqlens_q`` gives one answer on every path.

``k2q_to_q2k`` is the inverse (CSR -> ascending distinct block ids per token), on the device.
"""

from typing import Optional

import torch

from ._common import KV_BLOCK
from ._registry import add_op_namespace_prefix
from ._validate import check_devices, check_host_int, check_int_at_least, check_tensor, interpreter_active
from .csr_kernel import build_torch as _build_torch, build_triton as _build_triton, invert_csr_slots, slot_capacity
from .errors import MsaUnsupportedError

# tests: run the Triton kernels for CPU tensors too (honoured only under TRITON_INTERPRET=1)
_FORCE_TRITON_ON_CPU = False

__all__ = ["build_k2q_csr", "SparseK2qCsrBuilderSm100", "K2qSchedule", "k2q_to_q2k", "check_cu_seqlens",
           "default_total_rows", "max_kv_blocks_bound", "KV_BLOCK"]


def default_total_rows(total_k: int, batch: int) -> int:
    """docs/API.md §5.3 step 3: sync-free upper bound on ``sum_b ceil(Lk_b / 128)``."""
    if total_k % KV_BLOCK == 0:
        return max(0, total_k // KV_BLOCK + batch - 1)
    return -(-(total_k + batch * (KV_BLOCK - 1)) // KV_BLOCK)


def max_kv_blocks_bound(max_seqlen_k: Optional[int], total_k: int) -> int:
    """docs/API.md §5.3 step 4: ``ceil(max(max_seqlen_k or total_k, 128) / 128)``."""
    m = total_k if max_seqlen_k is None else int(max_seqlen_k)
    return -(-max(m, KV_BLOCK) // KV_BLOCK)



class K2qSchedule:
    """Opaque schedule object (docs/API.md §5.3); always disabled, accepted and ignored by the consumer."""

    def __init__(self):
        self.enabled = False
        self.scheduler_metadata = None
        self.work_count = None
        self.qsplit_indices = None
        self.split_counts = None
        self.target_q_per_cta = 0
        self.work_capacity = 0

    def __repr__(self):
        return "K2qSchedule(enabled=False)"



def _use_triton(device: torch.device) -> bool:
    """Triton kernels for CUDA tensors; CPU tensors take the PyTorch path, except under the Triton interpreter
    when the tests force the kernels (``_FORCE_TRITON_ON_CPU``). Without ``TRITON_INTERPRET=1`` Triton cannot
    run on CPU tensors at all, so the flag is ignored there (e.g. on a GPU machine)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _FORCE_TRITON_ON_CPU and interpreter_active()


@torch.library.custom_op(add_op_namespace_prefix("build_k2q_csr"), mutates_args=())
def _build_k2q_csr_op(q2k_indices: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      total_rows: int, max_kv_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(q2k_indices.device):
        return _build_triton(q2k_indices, cu_seqlens_q, cu_seqlens_k, total_rows, max_kv_blocks)
    return _build_torch(q2k_indices, cu_seqlens_q, cu_seqlens_k, total_rows, max_kv_blocks)


@_build_k2q_csr_op.register_fake
def _(q2k_indices, cu_seqlens_q, cu_seqlens_k, total_rows, max_kv_blocks):
    hkv, total_q, topk = q2k_indices.shape
    return (q2k_indices.new_empty((hkv, total_rows + 1), dtype=torch.int32),
            q2k_indices.new_empty((hkv, total_q * topk), dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k) -> int:
    """int32 rank-1 non-empty equal-shape ``cu_seqlens_q/k``; returns ``B``."""
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtypes=(torch.int32,))
    check_tensor("cu_seqlens_k", cu_seqlens_k, dtypes=(torch.int32,))
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.dim() != 1 or t.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor [B+1], got shape {tuple(t.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
                         "must have the same shape")
    return cu_seqlens_q.shape[0] - 1


def build_k2q_csr(q2k_indices, cu_seqlens_q, cu_seqlens_k, kv_block_size, *, total_k=None, max_seqlen_k=None,
                  max_seqlen_q=None, total_rows=None, qhead_per_kv=1, return_schedule=False):
    """Per-token block ids -> KV-major CSR (docs/API.md §5.3).

    q2k_indices: int32 [Hkv, total_q, topK] batch-local block ids (any strides).
    cu_seqlens_q, cu_seqlens_k: int32 [B+1]. kv_block_size must be 128. total_k: required host int.
    Returns ``(k2q_row_ptr int32 [Hkv, T+1], k2q_q_indices int32 [Hkv, total_q*topK])`` and, with
    ``return_schedule=True``, a disabled ``K2qSchedule`` as third element.
    """
    if total_k is None:
        raise ValueError("build_k2q_csr requires total_k from k.shape[0]")
    total_k = check_int_at_least("total_k", total_k)
    kv_block_size = check_int_at_least("kv_block_size", kv_block_size, 1)
    if kv_block_size != KV_BLOCK:
        raise MsaUnsupportedError(f"kv_block_size={kv_block_size} is not supported; only 128")
    check_tensor("q2k_indices", q2k_indices, dtypes=(torch.int32,))
    if q2k_indices.dim() != 3:
        raise ValueError(f"q2k_indices must be 3-D [Hkv, total_q, topK], got shape {tuple(q2k_indices.shape)}")
    if q2k_indices.shape[2] < 1:
        raise ValueError(f"q2k_indices: topK must be >= 1, got {q2k_indices.shape[2]}")
    batch = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k)
    check_devices((("q2k_indices", q2k_indices), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)),
                  kernel=False)
    max_seqlen_k = check_host_int("max_seqlen_k", max_seqlen_k, allow_none=True)
    max_seqlen_q = check_host_int("max_seqlen_q", max_seqlen_q, allow_none=True)
    if total_rows is None:
        total_rows = default_total_rows(total_k, batch)
    total_rows = check_int_at_least("total_rows", total_rows)
    qhead_per_kv = check_int_at_least("qhead_per_kv", qhead_per_kv, 1)
    if return_schedule and (max_seqlen_k is None or max_seqlen_q is None):
        raise ValueError("return_schedule=True requires max_seqlen_k and max_seqlen_q")
    dev = q2k_indices.device
    if dev.type != "cpu" and not dev.type == "cuda":
        raise ValueError(f"q2k_indices must be a CUDA or CPU tensor, got {dev}")
    row_ptr, q_idx = _build_k2q_csr_op(q2k_indices, cu_seqlens_q, cu_seqlens_k, total_rows,
                                       max_kv_blocks_bound(max_seqlen_k, total_k))
    if return_schedule:
        return row_ptr, q_idx, K2qSchedule()
    return row_ptr, q_idx


class SparseK2qCsrBuilderSm100:
    """Upstream's callable CSR builder (docs/API.md §5.4); runs on any supported GPU (and CPU)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, q2k_indices, cu_seqlens_q, cu_seqlens_k, *, total_k=None, blk_kv=128, max_seqlen_k=None,
                 max_seqlen_q=None, total_rows=None, qhead_per_kv=1, return_schedule=False):
        return build_k2q_csr(q2k_indices, cu_seqlens_q, cu_seqlens_k, blk_kv, total_k=total_k,
                             max_seqlen_k=max_seqlen_k, max_seqlen_q=max_seqlen_q, total_rows=total_rows,
                             qhead_per_kv=qhead_per_kv, return_schedule=return_schedule)

    def build(self, *args, **kwargs):
        return build_k2q_csr(*args, **kwargs)




@torch.library.custom_op(add_op_namespace_prefix("k2q_to_q2k"), mutates_args=())
def _k2q_to_q2k_op(row_ptr: torch.Tensor, q_idx: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   total_q: int, capacity: int) -> torch.Tensor:
    slots = invert_csr_slots(row_ptr, q_idx, cu_q, cu_k, total_q, slot_capacity(capacity))[0]
    big = torch.iinfo(torch.int32).max
    s = torch.sort(torch.where(slots < 0, torch.full_like(slots, big), slots), dim=2).values[:, :, :capacity]
    return torch.where(s == big, torch.full_like(s, -1), s).contiguous()


@_k2q_to_q2k_op.register_fake
def _(row_ptr, q_idx, cu_q, cu_k, total_q, capacity):
    return row_ptr.new_empty((row_ptr.shape[0], total_q, capacity), dtype=torch.int32)


def k2q_to_q2k(k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k, total_q: int, topK: int):
    """CSR -> per-token block ids ``int32 [Hkv, total_q, topK]``: ascending distinct ids, -1 tail.

    Set semantics of docs/API.md §5.5 (repeated entries once, entries outside ``[0, Lq_b)`` ignored, row
    pointers clamped). If a (g, t) has more than ``topK`` distinct blocks the result is unspecified.
    Device-side (no host sync); CPU tensors only under the Triton interpreter.
    """
    check_tensor("k2q_row_ptr", k2q_row_ptr, ndim=2, dtypes=(torch.int32,))
    check_tensor("k2q_q_indices", k2q_q_indices, ndim=2, dtypes=(torch.int32,))
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k)
    check_devices((("k2q_row_ptr", k2q_row_ptr), ("k2q_q_indices", k2q_q_indices), ("cu_seqlens_q", cu_seqlens_q),
                   ("cu_seqlens_k", cu_seqlens_k)))
    if k2q_row_ptr.shape[0] != k2q_q_indices.shape[0] or k2q_row_ptr.shape[1] < 1:
        raise ValueError("k2q_row_ptr must be [Hkv, T+1] and k2q_q_indices [Hkv, N] with the same Hkv")
    return _k2q_to_q2k_op(k2q_row_ptr, k2q_q_indices, cu_seqlens_q, cu_seqlens_k, int(total_q), int(topK))

