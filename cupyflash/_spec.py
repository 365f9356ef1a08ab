"""One frozen description of an attention call: what every backend receives.

Validation (:mod:`cupyflash._validate`) builds it from the public keywords before any work is done;
the backends take ``(q, k, v, spec)`` with q, k, v already seen as ``(batch, seqlen, heads,
headdim)`` whatever the caller's layout. A new variant adds a field here (its keyword in
``_api``, checked by ``_validate``), its rule and parameters to ``cuda_src/mask.cuh``, its NumPy
twin and the kernel's feature bit and parameters to ``cupyflash/_variants.py``, and its formula to
``cupyflash.reference`` (``docs/variants.md``, "Adding a variant"; the exact semantics are there too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

__all__ = ["Spec", "LAYOUTS"]

#: Accepted ``layout`` names: (batch, seqlen, heads, headdim) and (batch, heads, seqlen, headdim).
LAYOUTS = ("bshd", "bhsd")


@dataclass(frozen=True, eq=False)
class Spec:
    kind: str                    # 'numpy' or 'cupy'
    dtype: np.dtype              # of q, k, v
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_kv: int
    headdim: int
    scale: float
    causal: bool
    window: Tuple[int, int]      # (left, right), -1 = unbounded; causal has right = 0
    softcap: float               # 0.0 = off
    alibi_slopes: Any = None     # None or a float32 (batch, nheads) view (stride 0 where broadcast)
    attn_mask: Any = None        # None or a (batch, nheads, seqlen_q, seqlen_k) view (stride 0 where broadcast)
    mask_shape: Optional[Tuple[int, ...]] = None  # the caller's mask shape (dbias comes back in it)
    dropout_p: float = 0.0
    dropout_seed: Optional[int] = None  # an unsigned 64-bit integer when dropout_p > 0
    learnable_sink: Any = None   # None or the caller's (nheads,) array of sink logits
    layout: str = "bshd"
    batch_offset: int = 0        # the dropout counter's batch index of this call's first batch entry
    # Packed variable-length batches: (batch + 1,) host int64 offsets of each sequence's rows in the
    # (total, heads, headdim) q and k, v; seqlen_q and seqlen_k are then the longest lengths. None where the
    # caller's CuPy offsets stay on the device unread (_validate.offsets_stay_on_device).
    cu_seqlens_q: Optional[np.ndarray] = None
    cu_seqlens_k: Optional[np.ndarray] = None
    # The caller's offsets where they were contiguous CuPy arrays (cu_seqlens_q, cu_seqlens_k): the kernels
    # read them.
    device_offsets: Optional[Tuple[Any, Any]] = None
    total_q: int = 0  # a packed batch's rows of q and of k, v
    total_k: int = 0
    # A KV cache's rows in place (cupyflash._kvcache): host int64 (batch,) keys of each sequence, the
    # seqused_k[b] rows from cu_seqlens_k[b] (its offsets are then where each sequence's keys start, in any order).
    seqused_k: Optional[np.ndarray] = None
    # A paged KV cache read in place: sequence b's key positions cu_seqlens_k[b] ... (in place of rows; total_k
    # counts the positions) lie at row block_table[b, pos // page_size] * page_size + pos % page_size of k and v.
    # (batch, pages) int32 on the device for the CUDA backend (where reads_pages), host ints for the NumPy one.
    block_table: Any = None
    page_size: int = 0

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.nheads // self.nheads_kv

    @property
    def offset(self) -> int:
        """Bottom-right alignment: query i lines up with key i + offset."""
        return self.seqlen_k - self.seqlen_q

    @property
    def has_window(self) -> bool:
        return self.window != (-1, -1)

    @property
    def mask_kind(self) -> Optional[str]:
        """'bool' (True = takes part), 'bias' (added to the score) or None."""
        if self.attn_mask is None:
            return None
        return "bool" if np.dtype(self.attn_mask.dtype) == np.bool_ else "bias"

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None or self.device_offsets is not None

    @property
    def dropout(self) -> bool:
        return self.dropout_p > 0.0

    def swap_layout(self, x):
        """A (batch, seqlen, heads, headdim) view of a caller's array, or back: a zero-copy swap
        of axes 1 and 2 for layout 'bhsd', the array itself for 'bshd'."""
        return x.swapaxes(1, 2) if self.layout == "bhsd" else x

    def empty(self, empty, shape, dtype):
        """An output of (batch, seqlen, heads, headdim) ``shape``, contiguous in the caller's layout,
        seen as (batch, seqlen, heads, headdim); ``empty`` is the backend's allocator."""
        b, s, h, d = shape
        return self.swap_layout(empty((b, h, s, d) if self.layout == "bhsd" else (b, s, h, d), dtype))
