"""Out of memory as torch.OutOfMemoryError under enable().

PyTorch turns an exception thrown by a pluggable allocator into a plain RuntimeError unless it
is a c10::OutOfMemoryError (PyTorch issue 133280). torch_ellm._C does not link PyTorch, so a
tiny shim that does is compiled once with torch.utils.cpp_extension (cached by PyTorch in
TORCH_EXTENSIONS_DIR); the allocator calls its thrower when the pool is exhausted.
"""
import warnings

import torch

from . import _C

_SHIM = r"""
#include <c10/util/Exception.h>
#include <torch/library.h>

extern "C" void torch_ellm_throw_oom(const char* message) {
  throw c10::OutOfMemoryError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, message);
}

int64_t thrower_address() { return reinterpret_cast<int64_t>(&torch_ellm_throw_oom); }
void raise_oom(const std::string& message) { torch_ellm_throw_oom(message.c_str()); }

TORCH_LIBRARY(torch_ellm_oom, m) {
  m.def("thrower_address() -> int", &thrower_address);
  m.def("raise_oom(str message) -> ()", &raise_oom);
}
"""

_loaded = False


def load_shim():
    """Compile (first time only) and load the shim; returns the torch.ops namespace."""
    global _loaded
    if not _loaded:
        from torch.utils.cpp_extension import load_inline

        load_inline(name="torch_ellm_oom", cpp_sources=_SHIM, is_python_module=False)
        _loaded = True
    return torch.ops.torch_ellm_oom


def install():
    """Make the allocator raise torch.OutOfMemoryError. Returns False (with a warning) if the shim
    cannot be built here, in which case out of memory reaches users as a RuntimeError."""
    try:
        ops = load_shim()
    except Exception as e:  # no compiler or headers: degrade, but say so
        warnings.warn(f"torch_ellm: could not build the OOM shim ({e}); out of memory will raise RuntimeError "
                      "instead of torch.OutOfMemoryError")
        return False
    _C.set_oom_thrower(ops.thrower_address())
    return True
