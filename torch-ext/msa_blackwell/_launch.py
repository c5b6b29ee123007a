"""Low-overhead Triton launches and per-signature caches for the eager hot paths.

``TritonLauncher(kernel)`` launches a ``@triton.jit`` kernel from a positional tuple holding every parameter in
declaration order (constexprs included). The first launch of a *configuration* goes through Triton's normal
``kernel[grid](...)`` path (compiling if needed); it returns the compiled kernel, which is cached under the
caller's static key plus the 16-byte alignment of every tensor argument (the only per-call property Triton
specialises on that the static key does not already fix: the caller's key must cover dtypes, shapes, strides,
host ints and constexprs). Later launches call the compiled kernel's C launcher directly, skipping Triton's
Python argument binding and specialisation (Triton's launch hooks, if a profiler set any, are still called). The
interpreter always takes the normal path.

``SignatureCache``: a bounded dict for validated call signatures (``key -> whatever the caller derived``).
``tensor_key(t)``: a cheap hashable description of one tensor (dtype, shape, strides, device index).
"""

import torch
import triton

from ._validate import interpreter_active

try:
    from triton import knobs as _knobs
except ImportError:  # Triton < 3.4: no direct launches
    _knobs = None

_TRITON_MAJOR_MINOR = tuple(int(x) for x in triton.__version__.split(".")[:2])
# Triton >= 3.4 launches ``CompiledKernel.run(gx, gy, gz, stream, function, packed_metadata, launch_metadata,
# enter_hook, exit_hook, *all_params)``; earlier versions take another argument list.
_DIRECT_OK = _knobs is not None and _TRITON_MAJOR_MINOR >= (3, 4)


def _pdl_supported() -> bool:
    try:
        from triton.language.extra import cuda as _cuda
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return hasattr(_cuda, "gdc_wait") and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


# Programmatic dependent launch (sm_90+): Triton's ``launch_pdl`` option plus ``tl.extra.cuda.gdc_wait`` /
# ``gdc_launch_dependents``. A kernel launched this way may start while the previous kernel of its stream is still
# running; it must call ``gdc_wait()`` before touching global memory.
PDL_SUPPORTED = _pdl_supported()


def use_pdl(flag, major) -> bool:
    """True when a launch-table ``pdl`` flag applies on a device of compute-capability ``major`` (None: not a
    CUDA device): sm_90 or newer, a Triton with programmatic dependent launch, not under the interpreter."""
    return bool(flag) and PDL_SUPPORTED and major is not None and major >= 9 and not interpreter_active()


def tensor_key(t):
    """``(dtype, shape, strides, device index)`` of a tensor, or None."""
    if t is None:
        return None
    return (t.dtype, t.shape, t.stride(), t.get_device())


def eager() -> bool:
    """True when the caller may skip the custom-op dispatcher (not tracing under torch.compile)."""
    return not torch.compiler.is_compiling()


class SignatureCache(dict):
    """``dict`` with a size bound: cleared when full (signatures are few in a serving loop)."""

    def __init__(self, limit: int = 1024):
        super().__init__()
        self.limit = limit

    def put(self, key, value):
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value


def _hook(h):
    """A launch hook, or None when it is unset or an empty ``HookChain`` (Triton >= 3.5 always sets one; calling
    an empty chain still costs the launch-metadata build and two Python calls per launch)."""
    if h is None or (hasattr(h, "calls") and not h.calls):
        return None
    return h


def _disable_direct():
    global _DIRECT_OK
    _DIRECT_OK = False


class TritonLauncher:
    """Launch ``kernel`` with positional arguments (all parameters, declaration order); see the module doc."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}

    def __call__(self, grid, args, *, n_ptr, key=None, slot=None, num_warps=4, num_stages=2, launch_pdl=False):
        """grid: tuple of 1-3 ints; args: tuple of every kernel parameter; key: hashable static signature of
        this launch, or slot: a dict owned by the caller's cache entry for such a signature (grid, warps and
        stages included), which then holds the compiled kernels; neither: always the normal Triton path.
        n_ptr: the tensors are exactly ``args[:n_ptr]``, every later argument a host value. launch_pdl:
        programmatic dependent launch (the kernel calls ``gdc_wait`` first; the key / slot must cover it)."""
        # (the interpreter check, an environment read, only guards the first launch of a signature: a compiled
        # kernel is stored only when it was off)
        direct = _DIRECT_OK and (key is not None or slot is not None) and args[0].is_cuda
        if direct:
            # The tensors go to the C launcher as their device addresses: for a tensor object it would call
            # data_ptr() and cuPointerGetAttribute (a driver call) per pointer on every launch; the caller's
            # validation already fixed device and dtype.
            align = 0
            flat = [args[i].data_ptr() for i in range(n_ptr)]
            for a in flat:
                align = (align << 1) | ((a & 15) == 0)
            flat.extend(args[n_ptr:])
            if slot is not None:
                store, full = slot, align
            else:
                store, full = self.compiled, (key, align, num_warps, num_stages, args[0].get_device())
            ck = store.get(full)
            if ck is not None:
                g = grid + (1, 1)
                stream = torch._C._cuda_getCurrentRawStream(args[0].get_device())
                enter, leave = _hook(_knobs.runtime.launch_enter_hook), _hook(_knobs.runtime.launch_exit_hook)
                meta = None if enter is None else ck.launch_metadata(grid, stream, *args)  # profilers' hooks
                try:
                    ck.run(g[0], g[1], g[2], stream, ck.function, ck.packed_metadata, meta, enter, leave, *flat)
                    return
                except (TypeError, ValueError, AttributeError):  # launcher ABI of another Triton: argument parsing
                    _disable_direct()                            # fails before any launch; use Triton's path
                    direct = False
        if launch_pdl:
            ck = self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, launch_pdl=True)
        else:
            ck = self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages)
        if direct and ck is not None and hasattr(ck, "packed_metadata") and not interpreter_active():
            if len(store) >= 512:
                store.clear()
            store[full] = ck
