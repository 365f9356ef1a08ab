"""CuPy's handle on a CUDA stream another framework owns, for the torch and JAX adapters."""
from __future__ import annotations

from typing import Any, Tuple


class _StreamPointer:
    """A raw CUDA stream in the CUDA stream protocol, which ``cupy.cuda.Stream.from_external`` takes."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> Tuple[int, int]:
        return 0, self.ptr


def external_stream(cupy: Any, ptr: int, device_id: int) -> Any:
    """A CuPy stream over the raw stream ``ptr`` on ``device_id`` (``ExternalStream`` before CuPy 14)."""
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(_StreamPointer(ptr))
    return cupy.cuda.ExternalStream(ptr, device_id)
