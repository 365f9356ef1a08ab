"""cupyflash: FlashAttention for CuPy (and a tiled NumPy mirror).

Exact attention ``Dropout(Softmax(Mask(scale · q kᵀ))) v``, forward and backward, computed tile by
tile with an online softmax so the seqlen_q x seqlen_k score matrix never exists. CuPy arrays run
CUDA kernels; NumPy arrays run a tiled NumPy backend. ``import cupyflash`` needs neither cupy nor a
GPU.
"""

from ._api import attention, attention_backward, attention_vjp
from ._kvcache import attention_with_kvcache
from ._merge import merge_attention
from ._philox import dropout_mask
from . import reference

__version__ = "0.2.0"

__all__ = ["attention", "attention_backward", "attention_vjp", "attention_with_kvcache", "dropout_mask",
           "merge_attention", "reference", "__version__"]
