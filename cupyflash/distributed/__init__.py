"""cupyflash.distributed: ring attention (context parallelism), forward and backward.

Every rank holds a shard of one long sequence and calls :func:`ring_attention` (and
:func:`ring_attention_backward`) at once; K/V blocks travel around the ring of ranks, so a rank
holds at most two other ranks' blocks at a time, and the result is exact attention over the whole
sequence. Ranks talk through a communicator: :class:`LocalRing` (threads of one process, for
tests and for trying a schedule anywhere) or :class:`NcclComm` (one process per GPU; start them
with ``python -m cupyflash.distributed.launch``). ``import cupyflash.distributed`` needs neither
cupy nor mpi4py. See docs/distributed.md.
"""

from ._comm import LocalRing, NcclComm
from ._ring import LAYOUTS, ring_attention, ring_attention_backward, ring_attention_vjp, zigzag_shard, zigzag_unshard

__all__ = ["LAYOUTS", "LocalRing", "NcclComm", "ring_attention", "ring_attention_backward", "ring_attention_vjp",
           "zigzag_shard", "zigzag_unshard"]
