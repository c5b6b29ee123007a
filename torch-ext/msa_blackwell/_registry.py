"""The op namespace of this build, in exactly one place.

In a built variant, kernel-builder (or ``scripts/build_variant.py``) writes ``_ops.py`` next to this
file; it imports the compiled extension and defines the namespace ``_msa_blackwell_cuda_<uid>``.
In source-tree mode (``PYTHONPATH=torch-ext``, no build) there is no ``_ops.py``: Triton ops are then
registered under a fixed development namespace and ``NATIVE_OPS`` is ``None``, so callers of the
native ops take their PyTorch fallbacks.
"""

try:  # built variant
    from ._ops import ops as NATIVE_OPS, add_op_namespace_prefix  # noqa: F401
except ImportError:  # source tree, or the extension failed to load
    NATIVE_OPS = None

    def add_op_namespace_prefix(op_name: str) -> str:
        return f"_msa_blackwell_src::{op_name}"


def native_op(name: str):
    """The compiled op ``name`` of this build, or ``None`` when it is not available."""
    if NATIVE_OPS is None:
        return None
    try:
        return getattr(NATIVE_OPS, name)
    except (AttributeError, RuntimeError):
        return None
