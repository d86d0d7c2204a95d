"""Exceptions torch_ellm raises. OutOfMemoryError is a torch.OutOfMemoryError,
so code that already catches PyTorch's OOM keeps working."""
import torch


class OutOfMemoryError(torch.OutOfMemoryError):
    """A request the pool could not meet after freeing its cache, deflating and borrowing."""


class ReleasedError(RuntimeError):
    """A VirtualTensor used after release(), or released twice."""


class BackendError(RuntimeError):
    """A failed virtual-memory call (mmap, memfd, or a CUDA driver call); the message names it."""
