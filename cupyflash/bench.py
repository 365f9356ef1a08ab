"""Benchmark cupyflash against standard attention and PyTorch SDPA.

    python -m cupyflash.bench                      # FlashAttention-2 paper sweep
    python -m cupyflash.bench --quick --json r.json --plot docs/img/
    python -m cupyflash.bench --variants           # each variant's cost over plain attention
    python -m cupyflash.bench --decode             # one token against a KV cache, GB/s
    python -m cupyflash.bench --varlen             # a packed batch of mixed lengths against padding it

The default sweep follows the FlashAttention-2 paper: 16k tokens per batch
(batch = 16384 / seqlen), hidden size 2048 (nheads = 2048 / headdim),
seqlen 512 ... 16k, headdim 64 and 128, causal and not, bfloat16, and the
modes fwd, bwd and fwd+bwd.  Every case runs cupyflash and its peers on the
same random inputs:

* ``naive``: standard attention in CuPy, S = Q Kᵀ and P = softmax(S)
  materialised in float32 (float64 for float64 inputs), with its backward
  written out explicitly;
* ``torch-flash``, ``torch-efficient``, ``torch-cudnn`` (and ``torch-math``
  when asked for): ``torch.nn.functional.scaled_dot_product_attention``
  pinned to one backend, fed the same CuPy arrays through DLPack (no copy).

Variant flags (--window, --softcap, --alibi, --mask, --dropout, --sink) run each
variant next to ``cupyflash-plain``, cupyflash without it at the same shape,
and the peers that can express it; --variants runs the set the variant
kernels are held to.

FLOPs: 4 * batch * nheads * seqlen_q * seqlen_k * headdim for the forward,
halved when causal, only the visible band for a sliding window; backward =
2.5x and fwd+bwd = 3.5x the forward.  Times per call are the median over
batches of back-to-back calls timed with CUDA events after warm-up (a variant
and its plain case in interleaved batches).  Without a GPU the NumPy backend is compared with
naive NumPy attention at small sizes.  --decode times attention_with_kvcache with
one query token per sequence against a full cache (the peers attend the same
keys), in GB/s of keys and values read, and on a GPU as a share of the device's
copy bandwidth, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import tracemalloc
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import ml_dtypes
import numpy as np

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5, "decode": 1.0}
TORCH_BACKENDS = {
    "torch-flash": "FLASH_ATTENTION",
    "torch-efficient": "EFFICIENT_ATTENTION",
    "torch-cudnn": "CUDNN_ATTENTION",
    "torch-math": "MATH",
}
PEERS = ("naive", *TORCH_BACKENDS)
ALL_PEERS = ("naive", "torch-flash", "torch-efficient", "torch-cudnn")  # 'all': MATH only on request
PLAIN = "cupyflash-plain"
PADDED = "cupyflash-padded"  # --varlen: the packed batch padded to its longest sequence, the padding masked
DENSE = "cupyflash-dense"  # --varlen: a dense batch of about the same tokens, every sequence of the mean length
PAGED = "cupyflash-paged"  # --decode: the same cache in pages of DECODE_PAGE_SIZE rows, in random order
DECODE_PAGE_SIZE = 256
PAGE_SEED = 11
DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
TOKENS_PER_BATCH = 16384
HIDDEN = 2048
MiB = 2**20
GiB = 2**30
INSTALL = 'pip install ".[bench]" from the repository root'

# Defaults per backend: (seqlens, headdims, repeats, warmup); the --quick variant second.
GPU_SWEEP = ((512, 1024, 2048, 4096, 8192, 16384), (64, 128), 30, 5)
GPU_QUICK = ((512, 2048), (64, 128), 10, 3)
CPU_SWEEP = ((128, 256, 512), (64,), 5, 1)
CPU_QUICK = ((128, 256), (64,), 3, 1)

DROPOUT_SEED = 1234
PADDING_FRACTION = 0.1  # --mask padding hides this share of each sequence's last keys
DENSE_MASK_LIMIT = 4 * GiB  # largest attn_mask built for a torch peer to express a variant


@dataclass(frozen=True)
class Variant:
    """An attention variant, timed against plain attention at the same shape."""

    kind: str  # window, softcap, alibi, mask, dropout or sink
    value: Any = None  # window: left size; softcap: cap; mask: 'padding' or 'bias'; dropout: p

    @property
    def label(self) -> str:
        if self.value is None:
            return self.kind
        return f"{self.kind} {self.value:g}" if isinstance(self.value, (int, float)) else f"{self.kind} {self.value}"


# --variants: (variant, target: the largest variant/plain time ratio on a GPU).  The window runs
# at the longer seqlen and is compared with full causal attention: at most 0.25 is 4x faster.
VARIANT_PRESET = (
    (Variant("softcap", 50.0), 1.15),
    (Variant("alibi"), 1.15),
    (Variant("mask", "padding"), 1.15),
    (Variant("dropout", 0.1), 1.25),
    (Variant("window", 256), 0.25),
)
# --variants shapes per backend: (seqlen, window seqlen, headdim)
PRESET_SHAPES = {"cuda": (4096, 8192, 128), "numpy": (256, 1024, 64)}
# --varlen per backend: (sequences, shortest, longest, nheads, headdim); lengths uniform in
# [shortest, longest], drawn once from VARLEN_SEED
VARLEN_PRESET = {"cuda": (64, 128, 4096, 16, 128), "numpy": (8, 16, 256, 4, 64)}
VARLEN_SEED = 7
# --decode per backend: (batches, cache lengths, nheads, nheads_kv, headdim); one query token per sequence
DECODE_PRESET = {"cuda": ((1, 8, 32), (8192, 32768, 131072), 32, 8, 128), "numpy": ((1, 4), (256, 1024), 8, 2, 64)}


@dataclass(frozen=True)
class Case:
    mode: str
    causal: bool
    headdim: int
    seqlen: int
    batch: int
    nheads: int
    nheads_kv: int
    dtype: str
    variant: Variant | None = None
    lengths: tuple = ()  # a packed batch (cu_seqlens): its sequence lengths; seqlen is the longest
    queries: int = 1  # decode: query tokens per sequence

    @property
    def seqlen_q(self) -> int:
        """Decoding attends `queries` new queries per sequence to a cache of ``seqlen`` keys."""
        return self.queries if self.mode == "decode" else self.seqlen

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values read once."""
        return 2 * self.batch * self.seqlen * self.nheads_kv * self.headdim * DTYPES[self.dtype].itemsize

    @property
    def pairs(self) -> float:
        """(query, key) pairs credited per batch and head: the visible band for a window
        (query i sees keys i - L ... i), half the square when causal."""
        s = self.seqlen
        if self.mode == "decode":
            return s * self.queries
        if self.variant is not None and self.variant.kind == "window":
            left = min(self.variant.value, s - 1)
            return (left + 1) * s - left * (left + 1) / 2
        return s * s * (0.5 if self.causal else 1.0)

    @property
    def flops(self) -> float:
        """A packed batch is credited each sequence's own pairs; so is its padded peer."""
        pairs = (sum(n * n for n in self.lengths) * (0.5 if self.causal else 1.0) if self.lengths
                 else self.batch * self.pairs)
        return 4 * self.nheads * pairs * self.headdim * FLOP_FACTOR[self.mode]

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.headdim)

    @property
    def plain(self) -> Case:
        return dataclasses.replace(self, variant=None)

    @property
    def kind(self) -> str | None:
        return None if self.variant is None else self.variant.kind


@dataclass
class Result:
    status: str  # "ok", "OOM" or "n/a"
    ms: float | None = None
    tflops: float | None = None
    peak_bytes: int | None = None
    error: str = ""
    gbps: float | None = None  # decode: keys and values read per second
    sm_mhz: float | None = None  # GPU: the SM clock that the timed batches left, their median


class Unsupported(Exception):
    """An implementation that cannot express the case; the message says why."""


# --------------------------------------------------------------------------- inputs

def random_array(shape, dtype, xp=np, seed=0):
    """Standard-normal array of ``dtype`` (float16, bfloat16, float32, float64).

    Half-precision values are drawn in float32 and rounded to nearest by ``astype``
    (CuPy 14 and ml_dtypes both convert float32 -> bfloat16 natively).
    """
    dtype = np.dtype(dtype)
    base = np.float64 if dtype == np.float64 else np.float32
    if xp is np:
        x = np.random.default_rng(seed).standard_normal(shape, dtype=base)
    else:
        xp.random.seed(seed)
        x = xp.random.standard_normal(shape, dtype=base)
    return x.astype(dtype)


def alibi_slopes(nheads: int) -> np.ndarray:
    """BLOOM's slopes 2^(-8 (h + 1) / nheads), float32."""
    return (2.0 ** (-8.0 * np.arange(1, nheads + 1) / nheads)).astype(np.float32)


def make_inputs(case: Case, xp) -> dict:
    dtype = DTYPES[case.dtype]
    if case.lengths:  # packed: (total, heads, headdim) and the offsets of each sequence
        total = sum(case.lengths)
        q_shape, kv_shape = (total, case.nheads, case.headdim), (total, case.nheads_kv, case.headdim)
        return {
            "q": random_array(q_shape, dtype, xp, seed=1),
            "k": random_array(kv_shape, dtype, xp, seed=2),
            "v": random_array(kv_shape, dtype, xp, seed=3),
            "dout": random_array(q_shape, dtype, xp, seed=4),
            "cu_seqlens": xp.asarray(np.concatenate([[0], np.cumsum(case.lengths)]).astype(np.int32)),
        }
    q_shape = (case.batch, case.seqlen_q, case.nheads, case.headdim)
    kv_shape = (case.batch, case.seqlen, case.nheads_kv, case.headdim)
    return {
        "q": random_array(q_shape, dtype, xp, seed=1),
        "k": random_array(kv_shape, dtype, xp, seed=2),
        "v": random_array(kv_shape, dtype, xp, seed=3),
        "dout": random_array(q_shape, dtype, xp, seed=4),
    }


def variant_inputs(case: Case, xp) -> dict:
    """The arrays the case's variant adds to :func:`make_inputs`."""
    if case.kind == "alibi":
        return {"alibi_slopes": xp.asarray(alibi_slopes(case.nheads))}
    if case.variant == Variant("mask", "padding"):  # a key-padding mask: True = a real token
        mask = xp.ones((case.batch, 1, 1, case.seqlen), dtype=bool)
        mask[..., case.seqlen - int(case.seqlen * PADDING_FRACTION):] = False
        return {"attn_mask": mask}
    if case.variant == Variant("mask", "bias"):  # a per-head position bias shared by the batch, as T5's
        return {"attn_mask": random_array((1, case.nheads, case.seqlen, case.seqlen), DTYPES[case.dtype], xp, seed=5)}
    if case.kind == "sink":  # a logit per head, as gpt-oss learns them
        return {"learnable_sink": random_array((case.nheads,), np.dtype(np.float32), xp, seed=6)}
    return {}


def variant_kwargs(case: Case, x: dict) -> dict:
    """cupyflash's keywords for the case's variant."""
    v = case.variant
    if v is None:
        return {}
    if v.kind == "window":  # Mistral's sliding window: causal, query i sees keys i - L ... i
        return {"window_size": (v.value, 0)}
    if v.kind == "softcap":
        return {"softcap": v.value}
    if v.kind == "alibi":
        return {"alibi_slopes": x["alibi_slopes"]}
    if v.kind == "mask":
        return {"attn_mask": x["attn_mask"]}
    if v.kind == "sink":
        return {"learnable_sink": x["learnable_sink"]}
    return {"dropout_p": v.value, "dropout_seed": DROPOUT_SEED}


def dense_mask_bytes(case: Case) -> int:
    """Size of :func:`dense_mask`'s result."""
    if case.variant == Variant("mask", "padding"):
        return case.batch * case.seqlen * (case.seqlen if case.causal else 1)
    if case.kind == "alibi" or case.variant == Variant("mask", "bias"):
        return case.nheads * case.seqlen**2 * DTYPES[case.dtype].itemsize
    return case.seqlen**2


def dense_mask(case: Case, x: dict, xp, dtype):
    """Causality and the variant's keys and biases as one SDPA ``attn_mask``, broadcastable to
    (batch, nheads, seqlen, seqlen): bool (True = attends) when it only hides keys, else an
    additive bias in ``dtype`` with -inf where hidden; None when plain attention needs none."""
    s, v = case.seqlen, case.variant
    i = xp.arange(s, dtype=np.int32)[:, None]
    j = xp.arange(s, dtype=np.int32)[None, :]
    visible = (j <= i)[None, None] if case.causal else None  # seqlen_q == seqlen_k: no offset
    if case.kind == "window":
        visible &= j >= i - v.value
    elif v == Variant("mask", "padding"):
        visible = x["attn_mask"] if visible is None else visible & x["attn_mask"]
    ct = _compute_dtype(np.dtype(dtype))
    if case.kind == "alibi":
        bias = -x["alibi_slopes"][None, :, None, None].astype(ct) * xp.abs(i - j).astype(ct)
    elif v == Variant("mask", "bias"):
        bias = x["attn_mask"].astype(ct)
    else:
        return visible
    if visible is not None:
        bias = xp.where(visible, bias, ct(-np.inf))
    return bias.astype(dtype)


# --------------------------------------------------------------------------- naive attention

def _array_module(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def _heads_first(x, compute_dtype, groups=1):
    """(batch, seq, heads, dim) -> (batch, heads * groups, seq, dim) in compute_dtype."""
    xp = _array_module(x)
    x = x.astype(compute_dtype, copy=False)
    if groups > 1:
        x = xp.repeat(x, groups, axis=2)
    return x.transpose(0, 2, 1, 3)


def _compute_dtype(dtype):
    # CuPy's matmul refuses bfloat16, so standard attention computes in float32.
    return np.float64 if dtype == np.float64 else np.float32


def naive_forward(q, k, v, scale, bias=None, softcap=0.0):
    """Standard attention; returns (out, P, dcap) with P = softmax of the scores materialised.

    ``bias`` (compute dtype, -inf hides a key) is added to the scores after the softcap;
    ``dcap`` is the softcap's derivative for the backward, None without one.
    """
    xp = _array_module(q)
    ct = _compute_dtype(q.dtype)
    groups = q.shape[2] // k.shape[2]
    s = _heads_first(q, ct) @ _heads_first(k, ct, groups).swapaxes(-1, -2)
    s *= scale
    dcap = None
    if softcap:
        s /= softcap
        xp.tanh(s, out=s)
        dcap = 1 - s * s
        s *= softcap
    if bias is not None:
        s += bias
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    out = s @ _heads_first(v, ct, groups)
    return out.transpose(0, 2, 1, 3).astype(q.dtype), s, dcap


def naive_backward(dout, q, k, v, out, p, dcap, scale):
    """Explicit backward of standard attention given the saved probabilities P."""
    ct = _compute_dtype(q.dtype)
    groups = q.shape[2] // k.shape[2]
    do = _heads_first(dout, ct)
    dv = p.swapaxes(-1, -2) @ do
    ds = do @ _heads_first(v, ct, groups).swapaxes(-1, -2)  # dP
    ds -= (do * _heads_first(out, ct)).sum(axis=-1, keepdims=True)
    ds *= p  # dS = P * (dP - rowsum(dO * O))
    if dcap is not None:
        ds *= dcap
    dq = ds @ _heads_first(k, ct, groups)
    dk = ds.swapaxes(-1, -2) @ _heads_first(q, ct)
    dq *= scale
    dk *= scale

    def back(x, heads):  # (b, h, s, d) -> (b, s, heads, d), summing GQA groups
        b, h, s, d = x.shape
        return x.reshape(b, heads, h // heads, s, d).sum(axis=2).transpose(0, 2, 1, 3).astype(q.dtype)

    return back(dq, q.shape[2]), back(dk, k.shape[2]), back(dv, k.shape[2])


# --------------------------------------------------------------------------- implementations
# Each builder does the per-mode setup (e.g. the forward whose outputs a bwd
# case consumes) and returns a zero-argument callable that runs the mode once.

def build_cupyflash(case: Case, x: dict) -> Callable:
    import cupyflash

    q, k, v, dout = x["q"], x["k"], x["v"], x["dout"]
    kwargs = {"causal": case.causal, **variant_kwargs(case, x)}
    if "key_padding" in x:  # the padded peer of a packed batch
        kwargs["attn_mask"] = x["key_padding"]
    if case.lengths:
        longest = max(case.lengths)
        kwargs.update(cu_seqlens_q=x["cu_seqlens"], cu_seqlens_k=x["cu_seqlens"], max_seqlen_q=longest,
                      max_seqlen_k=longest)
    if case.mode == "decode":  # k and v are the cache, full
        return lambda: cupyflash.attention_with_kvcache(q, k, v, cache_seqlens=case.seqlen, **kwargs)
    if case.mode == "fwd":
        return lambda: cupyflash.attention(q, k, v, **kwargs)

    def backward(out, lse):  # a learnable sink's gradient too, as training asks for it
        return cupyflash.attention_backward(dout, q, k, v, out, lse, return_dsink="learnable_sink" in kwargs,
                                            **kwargs)

    if case.mode == "bwd":
        out, lse = cupyflash.attention(q, k, v, return_lse=True, **kwargs)
        return lambda: backward(out, lse)
    return lambda: backward(*cupyflash.attention(q, k, v, return_lse=True, **kwargs))


def build_padded(case: Case, x: dict) -> Callable:
    """cupyflash on the packed batch padded to its longest sequence (zeros), a key-padding mask
    hiding the padding: the work a dense call does for a batch of mixed lengths."""
    xp = _array_module(x["q"])
    batch, longest = len(case.lengths), max(case.lengths)
    starts = np.concatenate([[0], np.cumsum(case.lengths)[:-1]])

    def pad(a):
        bits = f"u{a.dtype.itemsize}"
        out = xp.zeros((batch, longest, *a.shape[1:]), bits)
        for b, (start, n) in enumerate(zip(starts, case.lengths)):
            out[b, :n] = a.view(bits)[start:start + n]
        return out.view(a.dtype)

    padded = {name: pad(x[name]) for name in ("q", "k", "v", "dout")}
    mask = xp.asarray(np.arange(longest)[None, :] < np.asarray(case.lengths)[:, None])[:, None, None, :]
    return build_cupyflash(dataclasses.replace(case, lengths=()), {**padded, "key_padding": mask})


def build_paged(case: Case, x: dict) -> Callable:
    """cupyflash on the case's cache copied into pages of DECODE_PAGE_SIZE rows placed at a random
    permutation of page ids, read through a block table (a NumPy array): what a paged cache costs over a
    contiguous one."""
    xp = _array_module(x["q"])
    page = min(DECODE_PAGE_SIZE, case.seqlen)
    per_seq = -(-case.seqlen // page)
    table = np.random.default_rng(PAGE_SEED).permutation(case.batch * per_seq).reshape(case.batch, per_seq)

    def pages(a):
        bits = f"u{a.dtype.itemsize}"
        rows = a.view(bits)
        if case.seqlen % page:
            rows = xp.zeros((case.batch, per_seq * page, *a.shape[2:]), bits)
            rows[:, :case.seqlen] = a.view(bits)
        out = xp.empty((case.batch * per_seq, page, *a.shape[2:]), bits)
        out[xp.asarray(table.ravel())] = rows.reshape(-1, page, *a.shape[2:])
        return out.view(a.dtype)

    import cupyflash

    # the table stays on the host, as a scheduler keeps it: a CuPy table would be read back to be checked
    k, v, block_table = pages(x["k"]), pages(x["v"]), table.astype(np.int32)
    return lambda: cupyflash.attention_with_kvcache(x["q"], k, v, cache_seqlens=case.seqlen, block_table=block_table)


def dense_case(case: Case) -> Case:
    """The dense batch a packed batch is compared with per token: as many sequences, each of the packed
    batch's mean length (about the same total tokens; credited its own pairs)."""
    return dataclasses.replace(case, lengths=(), seqlen=round(sum(case.lengths) / len(case.lengths)),
                               batch=len(case.lengths))


def build_dense(case: Case, x: dict) -> Callable:
    """cupyflash on `case`, a dense_case, with inputs of its own shape."""
    return build_cupyflash(case, make_inputs(case, _array_module(x["q"])))


def build_naive(case: Case, x: dict) -> Callable:
    if case.kind in ("dropout", "sink"):
        raise Unsupported(f"the naive peer has no {case.kind}")
    q, k, v, dout, scale = x["q"], x["k"], x["v"], x["dout"], case.scale
    xp, ct = _array_module(q), _compute_dtype(q.dtype)
    bias = dense_mask(case, x, xp, ct)
    if bias is not None and bias.dtype == bool:
        bias = xp.where(bias, ct(0), ct(-np.inf))
    softcap = case.variant.value if case.kind == "softcap" else 0.0
    if case.mode in ("fwd", "decode"):
        return lambda: naive_forward(q, k, v, scale, bias, softcap)[0]
    if case.mode == "bwd":
        out, p, dcap = naive_forward(q, k, v, scale, bias, softcap)
        return lambda: naive_backward(dout, q, k, v, out, p, dcap, scale)

    def fwd_bwd():
        out, p, dcap = naive_forward(q, k, v, scale, bias, softcap)
        return naive_backward(dout, q, k, v, out, p, dcap, scale)

    return fwd_bwd


def sdpa_kwargs(backend_name: str, case: Case, x: dict, torch) -> dict:
    """SDPA's keywords for the case, or Unsupported when this backend cannot express it."""
    if case.kind == "softcap":
        raise Unsupported("SDPA has no softcap (a function of each score, which no additive mask expresses)")
    if case.kind == "sink":
        raise Unsupported("SDPA has no learnable sink (a term of each row's softmax sum, which no mask expresses)")
    if case.kind == "dropout":
        return {"is_causal": case.causal, "dropout_p": case.variant.value}
    if case.kind is None:
        return {"is_causal": case.causal}  # seqlen_q == seqlen_k: top-left == bottom-right
    if backend_name == "FLASH_ATTENTION":
        raise Unsupported(f"torch's flash backend takes no attn_mask, which {case.variant.label} needs")
    if dense_mask_bytes(case) > DENSE_MASK_LIMIT:
        raise Unsupported(f"{case.variant.label} as a dense attn_mask would take "
                          f"{dense_mask_bytes(case) / GiB:.1f} GiB (limit {DENSE_MASK_LIMIT / GiB:g})")
    # is_causal cannot go with attn_mask: the mask carries causality too.
    return {"attn_mask": torch.from_dlpack(dense_mask(case, x, _array_module(x["q"]), DTYPES[case.dtype]))}


def build_torch(backend_name: str, case: Case, x: dict) -> Callable:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    backend = getattr(SDPBackend, backend_name)
    kwargs = sdpa_kwargs(backend_name, case, x, torch)
    # Zero-copy DLPack views, transposed to SDPA's (batch, heads, seq, dim) layout.
    q, k, v, dout = (torch.from_dlpack(x[n]).transpose(1, 2) for n in ("q", "k", "v", "dout"))
    if case.nheads != case.nheads_kv:
        kwargs["enable_gqa"] = True

    def forward():
        with sdpa_kernel(backend):
            return sdpa(q, k, v, **kwargs)

    if case.mode in ("fwd", "decode"):
        return torch.no_grad()(forward)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if case.mode == "bwd":
        out = forward()
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), (q, k, v), dout)


def builder(impl: str) -> Callable[[Case, dict], Callable]:
    if impl in ("cupyflash", PLAIN):
        return build_cupyflash
    if impl == PADDED:
        return build_padded
    if impl == DENSE:
        return build_dense
    if impl == PAGED:
        return build_paged
    if impl == "naive":
        return build_naive
    return lambda case, x: build_torch(TORCH_BACKENDS[impl], case, x)


# --------------------------------------------------------------------------- backends

class GpuBackend:
    name = "cuda"

    def __init__(self, torch_module=None):
        import cupy

        self.xp = cupy
        self.pool = cupy.get_default_memory_pool()
        self.torch = torch_module

    def measure_pair(self, fns: list[Callable], repeats: int, warmup: int) -> list[tuple[float, int, float]]:
        """(ms per call, peak bytes, SM MHz) of each function, their timed batches interleaved (a batch
        of each in turn, `repeats` rounds), so that the clock's drift over the run weighs on all alike."""
        peaks = [self.peak_bytes(fn) for fn in fns]
        return [(ms, peak, mhz) for (ms, mhz), peak in zip(self.times_per_call(fns, repeats, warmup), peaks)]

    def peak_bytes(self, fn: Callable) -> int:
        # After free_all_blocks() the CuPy pool holds exactly the live arrays (the
        # case's inputs plus this implementation's setup), so total_bytes() ==
        # used_bytes().  The pool reuses its cached blocks before asking the device
        # for more and never hands memory back on its own, so after one call
        # total_bytes() is the call's high-water mark of simultaneously live bytes
        # (rounded up to the pool's 512-byte unit).  Torch allocates through its own
        # caching allocator: its peak (max_memory_allocated, reset here) is added.
        self.cleanup()
        if self.torch is not None:
            self.torch.cuda.reset_peak_memory_stats()
        fn()
        self.xp.cuda.Device().synchronize()
        peak = self.pool.total_bytes()
        if self.torch is not None:
            peak += self.torch.cuda.max_memory_allocated()
        return peak

    #: Each timed batch of back-to-back calls lasts at least this long on the GPU.
    BATCH_SECONDS = 10e-3
    #: SM clocks of the clock probe behind each batch: about 0.1 ms, long beside its launch.
    PROBE_CYCLES = 200_000

    def times_per_call(self, fns: list[Callable], repeats: int, warmup: int) -> list[tuple[float, float]]:
        """(milliseconds per call, SM MHz) of each function, the medians over `repeats` batches of
        back-to-back calls after `warmup` calls: within a batch the host prepares a call while
        the GPU runs the one before, as in a training or serving loop and in the FA2 protocol's
        timer (torch.utils.benchmark), so a call costs max(host, GPU) time. Torch runs on the
        legacy default stream, which is also CuPy's current stream, so the events bracket its
        kernels too. Each batch starts behind one untimed call, so that it times the steady state
        and not the host's preparation of its first call. The clock probe (clock_probe.cu), queued
        right behind each batch, reads the clock that the batch left: under a power cap it varies
        by kernel, so that two times compare only with their clocks beside them."""
        from . import _cuda_backend, _plan

        stream = self.xp.cuda.get_current_stream()
        start, end = self.xp.cuda.Event(), self.xp.cuda.Event()
        launch = _plan.clock_probe()
        probe = _cuda_backend.compiled_kernel(launch.source, launch.name, launch.options)
        clocks = self.xp.zeros(2, self.xp.uint64)  # [cycles, ns]

        def batch(fn, calls):
            fn()  # queued first: the GPU is busy when the batch starts, so no host time is timed
            start.record(stream)
            for _ in range(calls):
                fn()
            end.record(stream)
            probe((1,), (launch.threads,), (np.uint64(self.PROBE_CYCLES), clocks))
            end.synchronize()
            cycles, ns = (int(x) for x in clocks.get(stream=stream))
            return self.xp.cuda.get_elapsed_time(start, end) * 1e-3 / calls, cycles / ns * 1e3

        for fn in fns:
            for _ in range(warmup):
                fn()
        calls = [max(1, min(50, math.ceil(self.BATCH_SECONDS / batch(fn, 1)[0]))) for fn in fns]
        batches = [[batch(fn, n) for fn, n in zip(fns, calls)] for _ in range(repeats)]
        return [(float(np.median([s for s, _ in column])) * 1e3, float(np.median([mhz for _, mhz in column])))
                for column in zip(*batches)]

    def cleanup(self):
        self.pool.free_all_blocks()
        if self.torch is not None:
            self.torch.cuda.empty_cache()

    def is_oom(self, exc: BaseException) -> bool:
        oom_types = [self.xp.cuda.memory.OutOfMemoryError]
        if self.torch is not None:
            oom_types.append(self.torch.cuda.OutOfMemoryError)
        # cuBLAS workspace failures surface as plain errors mentioning the allocation.
        return isinstance(exc, tuple(oom_types)) or "out of memory" in str(exc).lower()


class CpuBackend:
    name = "numpy"
    xp = np

    def measure_pair(self, fns: list[Callable], repeats: int, warmup: int) -> list[tuple[float, int, None]]:
        """(ms per call, peak bytes, None: no clock read) of each function, their timed calls interleaved."""
        for fn in fns:
            for _ in range(warmup):
                fn()
        peaks = [self.peak_bytes(fn) for fn in fns]
        times = [[self._seconds(fn) for fn in fns] for _ in range(repeats)]
        return [(float(np.median(column)) * 1e3, peak, None) for column, peak in zip(zip(*times), peaks)]

    @staticmethod
    def peak_bytes(fn: Callable) -> int:
        # tracemalloc is tracing since before the inputs were created and NumPy
        # reports its buffers to it, so the peak includes inputs and setup.
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]

    @staticmethod
    def _seconds(fn: Callable) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def cleanup(self):
        pass

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, MemoryError)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def gpu_unavailable_reason() -> str | None:
    """None when CuPy sees a CUDA device, else what is missing."""
    if importlib.util.find_spec("cupy") is None:
        return 'cupy is not installed: pip install ".[cuda12]" or ".[cuda13]" from the repository root'
    try:
        import cupy
    except Exception as exc:
        return f"cupy does not import: {exc}".splitlines()[0]
    runtime = cupy.cuda.runtime
    try:
        driver = runtime.driverGetVersion()  # 0 when no driver is installed
        if driver == 0:
            return "no NVIDIA driver found (libcuda is not installed or not on the library path)"
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as exc:
        if exc.status == 35:  # cudaErrorInsufficientDriver, with a driver present: an old one
            return (f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, older than the CUDA "
                    f"{_cuda_version(runtime.runtimeGetVersion())} that cupy {cupy.__version__} is built for: "
                    f"update the driver, or install cupy-cuda{driver // 1000}x")
        if exc.status != 100:  # cudaErrorNoDevice
            return f"CUDA error: {exc}".splitlines()[0]
        count = 0
    except Exception as exc:  # cupy without a loadable CUDA runtime, ...
        return f"cupy cannot use CUDA: {type(exc).__name__}: {exc}".splitlines()[0]
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = "" if visible is None else f"; CUDA_VISIBLE_DEVICES={visible!r}"
        return f"the NVIDIA driver (CUDA {_cuda_version(driver)}) sees no CUDA device{hidden}"
    return None


def load_torch():
    """(torch, None) when torch can run on the GPU, else (None, what is missing).
    Never imported at package import."""
    if importlib.util.find_spec("torch") is None:
        return None, "torch is not installed (a CUDA build of torch runs them)"
    try:
        import torch
    except Exception as exc:
        return None, f"torch does not import: {exc}".splitlines()[0]
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU"
    return torch, None


# --------------------------------------------------------------------------- sweep

def run_case(impl: str, case: Case, inputs: dict, backend, repeats: int, warmup: int) -> Result:
    """Time one implementation on one case; OOM and unsupported cases become a status."""
    return run_cases([(impl, case)], inputs, backend, repeats, warmup)[0]


def run_cases(runs: list[tuple[str, Case]], inputs: dict, backend, repeats: int, warmup: int) -> list[Result]:
    """Time (implementation, case) runs on the same inputs with their batches interleaved; an OOM
    or unsupported run makes every result of the group that status."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch explains every backend it rejects
            measured = backend.measure_pair([builder(impl)(case, inputs) for impl, case in runs], repeats, warmup)
        results = [Result("ok", ms, case.flops / (ms * 1e-3) / 1e12, peak,
                          gbps=case.kv_bytes / (ms * 1e-3) / 1e9 if case.mode == "decode" else None, sm_mhz=mhz)
                   for (_, case), (ms, peak, mhz) in zip(runs, measured)]
    except Unsupported as exc:
        results = [Result("n/a", error=str(exc))] * len(runs)
    except Exception as exc:
        status = "OOM" if backend.is_oom(exc) else "n/a"
        results = [Result(status, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])] * len(runs)
    backend.cleanup()  # after the except block, so the traceback's arrays are gone
    return results


def build_cases(modes, causals, headdims, seqlens, dtype, batch, nheads, nheads_kv, variants=(None,)) -> list[Case]:
    cases = []
    for variant in variants:
        for mode in modes:
            # A sliding window is causal (window_size=(L, 0)).
            for causal in (True,) if variant is not None and variant.kind == "window" else causals:
                for hd in headdims:
                    for s in seqlens:
                        h = nheads or max(1, HIDDEN // hd)
                        cases.append(Case(mode, causal, hd, s, batch or max(1, TOKENS_PER_BATCH // s),
                                          h, nheads_kv or h, dtype, variant))
    return cases


@contextlib.contextmanager
def progress(total):
    """A progress bar on stderr (rich, else tqdm, else none); yields ``step(text)``, called as
    each run starts."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        pass
    else:
        columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("", total=total)
            yield lambda text: bar.update(task, description=text, advance=1)
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield lambda text: None
        return
    with tqdm(total=total, file=sys.stderr, leave=False, unit="run") as bar:
        def step(text):
            bar.set_description(text, refresh=False)
            bar.update()

        yield step


def describe(case: Case) -> str:
    variant = f"{case.variant.label} " if case.variant else ""
    return f"{variant}{case.mode} {'causal ' if case.causal else ''}d{case.headdim} n{case.seqlen}"


def sweep(cases, impls, backend, repeats, warmup) -> list[dict[str, Result]]:
    rows = []
    with progress(len(cases) * len(impls)) as step:
        for case in cases:
            inputs = make_inputs(case, backend.xp)
            row = {}
            if PLAIN in impls:
                # The variant against plain attention at its shape, their batches interleaved: the
                # ratio is the target. Plain's peak memory is taken before the variant's arrays exist.
                step(f"{PLAIN} {describe(case)}")
                plain_peak = backend.peak_bytes(builder(PLAIN)(case.plain, inputs))
                backend.cleanup()
                inputs.update(variant_inputs(case, backend.xp))
                step(f"cupyflash {describe(case)}")
                row[PLAIN], row["cupyflash"] = run_cases([(PLAIN, case.plain), ("cupyflash", case)], inputs, backend,
                                                         repeats, warmup)
                if row[PLAIN].status == "ok":
                    row[PLAIN].peak_bytes = plain_peak
            for impl in impls:
                if impl not in row:
                    step(f"{impl} {describe(case)}")
                    row[impl] = run_case(impl, dense_case(case) if impl == DENSE else case, inputs, backend, repeats,
                                         warmup)
            rows.append(row)
            del inputs
            backend.cleanup()
    return rows


# --------------------------------------------------------------------------- output

def ratio(peer: Result, ours: Result) -> float | None:
    """Peer time / cupyflash time (> 1: cupyflash is faster)."""
    if peer.status == "ok" and ours.status == "ok":
        return peer.ms / ours.ms
    return None


def variant_ratio(row: dict[str, Result]) -> float | None:
    """Variant time / plain time (< 1: the variant is faster)."""
    return ratio(row["cupyflash"], row[PLAIN]) if PLAIN in row else None


def render_table(columns, rows, left: int) -> str:
    """``columns``: (group, name) pairs, each group's title written above its first column;
    the first ``left`` columns are left-aligned.  Drawn by rich when importable."""
    heads = [(g if i == 0 or columns[i - 1][0] != g else "", n) for i, (g, n) in enumerate(columns)]
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        widths = [max(len(g), len(n), *(len(r[i]) for r in rows)) for i, (g, n) in enumerate(heads)]

        def line(cells):
            return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        lines = [line([g for g, _ in heads]), line([n for _, n in heads])]
        return "\n".join(lines + ["-" * len(lines[1])] + [line(r) for r in rows])
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for i, (g, n) in enumerate(heads):
        table.add_column(Text(f"{g}\n{n}"), justify="left" if i < left else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(Text(c) for c in r))
    # Wide enough that a narrow terminal or a pipe does not squeeze the columns.
    console = Console(width=10**4, force_terminal=False)
    with console.capture() as out:
        console.print(table)
    return "\n".join(line.rstrip() for line in out.get().splitlines())


def _cells(r: Result) -> list[str]:
    if r.status == "ok":
        rate = f"{r.gbps:.4g}" if r.gbps is not None else f"{r.tflops:.4g}"
        return [f"{r.ms:.3f}", rate, f"{r.peak_bytes / MiB:.1f}"]
    return [r.status, "-", "-"]


def copy_bandwidth(backend, nbytes=1 << 30, repeats=10) -> float:
    """GB/s of a device-to-device copy of `nbytes` (cupy.copyto; reads plus writes), the median of
    `repeats` timed copies: what a pass that only streams memory could reach on this device."""
    xp = backend.xp
    src, dst = xp.ones(nbytes // 4, xp.float32), xp.empty(nbytes // 4, xp.float32)
    start, end = xp.cuda.Event(), xp.cuda.Event()
    seconds = []
    for _ in range(repeats + 2):
        start.record()
        xp.copyto(dst, src)
        end.record()
        end.synchronize()
        seconds.append(xp.cuda.get_elapsed_time(start, end) * 1e-3)
    del src, dst
    backend.cleanup()
    return 2 * nbytes / float(np.median(seconds[2:])) / 1e9


def format_table(cases, rows, impls, copy_gbps=None) -> str:
    """The sweep's table; with `copy_gbps` (decode) cupyflash's GB/s as a share of the copy bandwidth too."""
    peers = [i for i in impls if i not in ("cupyflash", PLAIN)]
    variants = any(c.variant for c in cases)
    decode = any(c.mode == "decode" for c in cases)
    packed = any(c.lengths for c in cases)
    columns = [("", "variant")] if variants else []
    columns += [("", "mode"), ("", "causal"), ("", "hdim"), ("", "batch" if decode or packed else "seqlen")]
    columns += [("", "cache"), ("", "queries")] if decode else [("", "lengths")] if packed else []
    for impl in impls:
        columns += [(impl, "ms"), (impl, "GB/s" if decode else "TFLOP/s"), (impl, "MiB")]
    columns += [("cupyflash", "of copy")] if copy_gbps else []
    columns += [("cupyflash speed-up", f"vs {p}") for p in peers]
    body = []
    for case, row in zip(cases, rows):
        cells = [case.variant.label] if variants else []
        cells += [case.mode, "yes" if case.causal else "no", str(case.headdim)]
        if decode:
            cells += [str(case.batch), str(case.seqlen), str(case.queries)]
        elif packed:
            cells += [str(case.batch), f"{min(case.lengths)}-{max(case.lengths)}"]
        else:
            cells.append(str(case.seqlen))
        for impl in impls:
            cells += _cells(row[impl])
        if copy_gbps:
            ours = row["cupyflash"]
            cells.append(f"{ours.gbps / copy_gbps:.0%}" if ours.status == "ok" else "-")
        for p in peers:
            x = ratio(row[p], row["cupyflash"])
            cells.append("-" if x is None else f"{x:.2f}x")
        body.append(cells)
    return render_table(columns, body, left=(5 if variants else 4) + (2 if decode else packed))


def format_variant_table(cases, rows, targets) -> str:
    """Variant time / plain time per case, and the target where one is set."""
    columns = [("", "variant"), ("", "mode"), ("", "causal"), ("", "hdim"), ("", "seqlen"),
               ("ms", "plain"), ("ms", "variant"), ("", "variant/plain"), ("SM MHz", "plain"), ("SM MHz", "variant")]
    if targets:
        columns += [("", "target"), ("", "met")]
    body = []
    for case, row in zip(cases, rows):
        x = variant_ratio(row)
        cells = [case.variant.label, case.mode, "yes" if case.causal else "no", str(case.headdim), str(case.seqlen),
                 _cells(row[PLAIN])[0], _cells(row["cupyflash"])[0], "-" if x is None else f"{x:.3f}",
                 *("-" if r.sm_mhz is None else f"{r.sm_mhz:.0f}" for r in (row[PLAIN], row["cupyflash"]))]
        if targets:
            target = targets.get(case.variant)
            cells += ["-", "-"] if target is None else [f"<= {target:g}", "-" if x is None else
                                                        "yes" if x <= target else "NO"]
        body.append(cells)
    return render_table(columns, body, left=5)


def git_commit() -> str:
    """HEAD of the checkout the bench runs from, with "-dirty" when tracked files differ from it (the
    figures then belong to no commit)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=here, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.returncode != 0 else "")


def environment(backend, torch_module) -> dict[str, Any]:
    import cupyflash

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "cupyflash": getattr(cupyflash, "__version__", "unknown"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "backend": backend.name,
    }
    if backend.name == "cuda":
        cupy = backend.xp
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        env.update({
            "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "compute_capability": dev.compute_capability,
            "driver": _cuda_version(cupy.cuda.runtime.driverGetVersion()),
            "cuda_runtime": _cuda_version(cupy.cuda.runtime.runtimeGetVersion()),
            "cupy": cupy.__version__,
        })
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    if torch_module is not None:
        env["torch"] = torch_module.__version__
    return env


def to_json(cases, rows, impls, env, settings, targets=None) -> dict:
    """The plain sweep's records are unchanged; variant cases add ``variant``, ``plain_flops``,
    ``variant_ratio`` (variant time / plain time) and, for --variants, ``target``."""
    peers = [i for i in impls if i not in ("cupyflash", PLAIN)]
    records = []
    for case, row in zip(cases, rows):
        record = asdict(case)
        del record["variant"]
        if not case.lengths:
            del record["lengths"]
        record.update({"flops": case.flops, "results": {i: asdict(row[i]) for i in impls},
                       "speedup": {p: ratio(row[p], row["cupyflash"]) for p in peers}})
        if case.variant is not None:
            x = variant_ratio(row)
            record.update({"variant": {**asdict(case.variant), "label": case.variant.label},
                           "plain_flops": case.plain.flops, "variant_ratio": x})
            target = (targets or {}).get(case.variant)
            if target is not None:
                record["target"] = {"max_variant_ratio": target, "met": None if x is None else x <= target}
        records.append(record)
    return {"environment": env, "settings": settings, "cases": records}


def plot_paths(path: str) -> tuple[str, str]:
    """A directory (existing, or ending in a separator) gets tflops.png and memory.png;
    anything else is a file-name prefix."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        os.makedirs(path, exist_ok=True)
        return os.path.join(path, "tflops.png"), os.path.join(path, "memory.png")
    sep = "" if path.endswith(("_", "-", ".")) else "_"
    return f"{path}{sep}tflops.png", f"{path}{sep}memory.png"


def plot(cases, rows, impls, path: str) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panel(c):
        return c.mode, c.variant, c.causal, c.headdim

    panels = list(dict.fromkeys(panel(c) for c in cases))
    columns = list(dict.fromkeys(p[1:] for p in panels))
    modes = list(dict.fromkeys(p[0] for p in panels))
    seqlens = sorted({c.seqlen for c in cases})
    outputs = plot_paths(path)
    for filename, metric, label in zip(outputs, ("tflops", "peak_bytes"), ("TFLOP/s", "peak memory (MiB)")):
        fig, axes = plt.subplots(len(modes), len(columns), squeeze=False, sharex=True,
                                 figsize=(3.6 * len(columns), 2.8 * len(modes)))
        for key in panels:
            mode, variant, causal, hd = key
            ax = axes[modes.index(mode)][columns.index(key[1:])]
            for impl in impls:
                pts = [(c.seqlen, getattr(row[impl], metric)) for c, row in zip(cases, rows)
                       if panel(c) == key and row[impl].status == "ok"]
                if pts:
                    xs, ys = zip(*pts)
                    ys = [y / MiB for y in ys] if metric == "peak_bytes" else ys
                    ax.plot(xs, ys, marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            ax.minorticks_off()
            if metric == "peak_bytes":
                ax.set_yscale("log")
            title = f"{mode}, {'causal' if causal else 'non-causal'}, hdim {hd}"
            ax.set_title(f"{variant.label}: {title}" if variant else title, fontsize=9)
            ax.grid(alpha=0.3)
        for ax in axes[-1]:
            ax.set_xlabel("seqlen")
        for ax in axes[:, 0]:
            ax.set_ylabel(label)
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="upper center", ncol=len(impls), frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        fig.savefig(filename, dpi=120)
        plt.close(fig)
    return outputs


# --------------------------------------------------------------------------- CLI

def _int_list(text: str) -> list[int]:
    """'512,1k,16k' -> [512, 1024, 16384]."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        out.append(int(item[:-1]) * 1024 if item.endswith("k") else int(item))
    return out


def _peer_list(text: str) -> list[str]:
    text = text.strip().lower()
    if text in ("all", "none", ""):
        return list(ALL_PEERS) if text == "all" else []
    peers = [p.strip() for p in text.split(",")]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {unknown}; choose from {list(PEERS)}, 'all' or 'none'")
    return peers


def _mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",")]
    if not set(modes) <= set(MODES):
        raise argparse.ArgumentTypeError(f"modes must be among {list(MODES)}")
    return modes


def _number(kind, low, high, closed_low):
    def parse(text: str):
        value = kind(text)
        if not ((value >= low if closed_low else value > low) and (high is None or value < high)):
            bounds = f"{'[' if closed_low else '('}{low}, {'inf' if high is None else high})"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cupyflash-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--headdims", type=_int_list, help="comma list, e.g. 64,128")
    p.add_argument("--seqlens", type=_int_list, help="comma list, e.g. 512,1k,16k")
    p.add_argument("--batch", type=int, help="override batch (default 16384 // seqlen on GPU)")
    p.add_argument("--nheads", type=int, help="override nheads (default 2048 // headdim on GPU)")
    p.add_argument("--nheads-kv", type=int, help="key/value heads for GQA (default nheads)")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--modes", type=_mode_list, help="comma list of fwd,bwd,fwd+bwd (default all three)")
    p.add_argument("--peers", type=_peer_list, default=list(ALL_PEERS),
                   help="comma list of naive,torch-flash,torch-efficient,torch-cudnn,torch-math, "
                        "or 'all' (everything but torch-math) or 'none'")
    p.add_argument("--repeats", type=int, help="timed runs per case (default 30)")
    p.add_argument("--warmup", type=int, help="untimed runs before timing (default 5)")
    p.add_argument("--quick", action="store_true", help="small sweep: seqlen 512,2048 (CPU: 128,256), fewer repeats")
    p.add_argument("--cpu", action="store_true", help="benchmark the NumPy backend even if a GPU is present")
    p.add_argument("--json", metavar="PATH", help="write every figure and the environment as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="directory or file prefix for tflops.png and memory.png (needs matplotlib)")
    v = p.add_argument_group("variants", "each flag is one variant, timed next to cupyflash-plain at the same shape")
    v.add_argument("--window", type=_number(int, 0, None, True), metavar="L",
                   help="sliding window as Mistral: causal, window_size=(L, 0), query i sees keys i-L..i")
    v.add_argument("--softcap", type=_number(float, 0, None, False), metavar="C",
                   help="score soft-capping C*tanh(score/C), e.g. 50 as Gemma-2")
    v.add_argument("--alibi", action="store_true", help="ALiBi with BLOOM's slopes 2^(-8(h+1)/nheads)")
    v.add_argument("--mask", choices=("padding", "bias"),
                   help="padding: bool (batch, 1, 1, seqlen) mask hiding each sequence's last 10%% of keys; "
                        "bias: float (1, nheads, seqlen, seqlen) additive bias in the input dtype")
    v.add_argument("--dropout", type=_number(float, 0, 1, False), metavar="P",
                   help=f"dropout probability (dropout_seed={DROPOUT_SEED})")
    v.add_argument("--sink", action="store_true",
                   help="a learnable sink per head (gpt-oss), standard normal logits; the backward returns dsink too")
    p.add_argument("--varlen", action="store_true",
                   help="a packed batch of mixed lengths (cu_seqlens) against the same batch padded to its longest "
                        f"sequence ({PADDED}) and a dense batch of about the same tokens, every sequence of the mean "
                        f"length ({DENSE}): 64 sequences of 128-4096 tokens, 16 heads, hdim 128; TFLOP/s count real "
                        "pairs only; --modes, --causal, --headdims, --nheads, --nheads-kv override")
    p.add_argument("--decode", action="store_true",
                   help="decoding against a KV cache (attention_with_kvcache; GB/s of keys and values read): one "
                        "query token, GQA 32/8, hdim 128, batch 1,8,32 x cache 8k,32k,128k, contiguous and paged "
                        f"({PAGED}: pages of {DECODE_PAGE_SIZE} rows in random order); --batch, --seqlens, "
                        "--headdims, --nheads, --nheads-kv, --queries override")
    p.add_argument("--queries", type=int, default=1,
                   help="--decode: query tokens per sequence, each seeing the whole cache (speculative decoding's "
                        "draft, a prompt's chunk; default 1)")
    v.add_argument("--variants", action="store_true",
                   help="the targets: softcap 50, ALiBi, padding mask and dropout 0.1 at seqlen 4096, window 256 at "
                        "8192 against full causal; bf16, hdim 128, 16 heads, 16k tokens, fwd and bwd")
    args = p.parse_args(argv)
    if args.variants and variants_from_args(args):
        p.error("--variants runs its own set: leave out --window, --softcap, --alibi, --mask, --dropout and --sink")
    if args.queries != 1 and not args.decode or args.queries < 1:
        p.error(f"--queries takes a count of at least 1 and goes with --decode, got {args.queries}")
    if args.decode and (args.variants or variants_from_args(args) or args.modes):
        p.error("--decode runs one forward mode without variants: leave out --variants, the variant flags and --modes")
    if args.varlen and (args.decode or args.variants or variants_from_args(args)):
        p.error("--varlen runs without variants and is not --decode: leave out --decode, --variants and the variant "
                "flags")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error(f"--plot needs matplotlib: {INSTALL}")
    return args


def variants_from_args(args) -> list[Variant]:
    variants = []
    if args.window is not None:
        variants.append(Variant("window", args.window))
    if args.softcap is not None:
        variants.append(Variant("softcap", args.softcap))
    if args.alibi:
        variants.append(Variant("alibi"))
    if args.mask is not None:
        variants.append(Variant("mask", args.mask))
    if args.dropout is not None:
        variants.append(Variant("dropout", args.dropout))
    if args.sink:
        variants.append(Variant("sink"))
    return variants


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = None if args.cpu else gpu_unavailable_reason()
    peers = list(args.peers)
    torch_module = None
    if not args.cpu and reason is None:
        if any(p in TORCH_BACKENDS for p in peers):
            torch_module, why = load_torch()
            if torch_module is None:
                print(f"Skipping the torch peers: {why}.")
                peers = [p for p in peers if p not in TORCH_BACKENDS]
        backend = GpuBackend(torch_module)
        seqlens, headdims, repeats, warmup = GPU_QUICK if args.quick or args.variants else GPU_SWEEP
        dtype, batch, nheads = args.dtype or "bfloat16", args.batch, args.nheads
    else:
        print(f"{'--cpu' if args.cpu else f'No GPU: {reason}.'} "
              "Benchmarking the NumPy backend against naive NumPy at small sizes.")
        peers = [p for p in peers if p == "naive"]
        backend = CpuBackend()
        seqlens, headdims, repeats, warmup = CPU_QUICK if args.quick or args.variants else CPU_SWEEP
        dtype, batch, nheads = args.dtype or "float32", args.batch or 1, args.nheads or 2
    repeats = args.repeats or repeats
    warmup = warmup if args.warmup is None else args.warmup
    causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    shape = (dtype, batch, nheads, args.nheads_kv)
    targets = {}
    if args.varlen:
        count, shortest, longest, varlen_heads, headdim = VARLEN_PRESET[backend.name]
        lengths = tuple(int(n) for n in np.random.default_rng(VARLEN_SEED).integers(shortest, longest + 1, count))
        heads = args.nheads or varlen_heads
        cases = [Case(mode, causal, hd, max(lengths), count, heads, args.nheads_kv or heads, dtype, lengths=lengths)
                 for mode in args.modes or MODES for causal in causals for hd in args.headdims or [headdim]]
        peers = [PADDED, DENSE]
    elif args.decode:
        batches, caches, decode_heads, decode_heads_kv, headdim = DECODE_PRESET[backend.name]
        cases = [Case("decode", False, hd, cache, b, args.nheads or decode_heads,
                      args.nheads_kv or args.nheads or decode_heads_kv, dtype, queries=args.queries)
                 for hd in args.headdims or [headdim] for b in ([args.batch] if args.batch else batches)
                 for cache in args.seqlens or caches]
        peers = [PAGED, *peers]
    elif args.variants:
        seqlen, window_seqlen, headdim = PRESET_SHAPES[backend.name]
        headdims, modes = args.headdims or [headdim], args.modes or ["fwd", "bwd"]
        cases = []
        for variant, target in VARIANT_PRESET:
            lengths = args.seqlens or [window_seqlen if variant.kind == "window" else seqlen]
            cases += build_cases(modes, causals, headdims, lengths, *shape, variants=[variant])
            if backend.name == "cuda":  # the targets are for the CUDA kernels
                targets[variant] = target
    else:
        variants = variants_from_args(args) or [None]
        cases = build_cases(args.modes or MODES, causals, args.headdims or headdims, args.seqlens or seqlens,
                            *shape, variants=variants)
    impls = ["cupyflash", *([PLAIN] if cases[0].variant else []), *peers]

    if backend.name == "numpy":
        tracemalloc.start()
    try:
        rows = sweep(cases, impls, backend, repeats, warmup)
    finally:
        if backend.name == "numpy":
            tracemalloc.stop()

    env = environment(backend, torch_module)
    copy_gbps = copy_bandwidth(backend) if args.decode and backend.name == "cuda" else None
    print(f"{env['device']} | {dtype} | median of {repeats} runs after {warmup} warm-up | "
          f"peak memory includes inputs" + (f" | copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else ""))
    print(format_table(cases, rows, impls, copy_gbps))
    errors = sorted({f"{impl}: {r.error}" for row in rows for impl, r in row.items() if r.status == "n/a"})
    for line in errors:
        print(f"n/a  {line}")
    if cases[0].variant:
        print("\nVariant cost: cupyflash time with the variant / without it at the same shape"
              " (a window's plain case is full causal attention)")
        print(format_variant_table(cases, rows, targets))
    if args.json:
        settings = {"dtype": dtype, "repeats": repeats, "warmup": warmup, "impls": impls}
        if copy_gbps:
            settings["copy_gbps"] = copy_gbps
        if cases[0].variant:
            settings["variants"] = list(dict.fromkeys(c.variant.label for c in cases))
            settings["preset"] = "variants" if args.variants else None
        with open(args.json, "w") as f:
            json.dump(to_json(cases, rows, impls, env, settings, targets), f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        print("wrote " + " and ".join(plot(cases, rows, impls, args.plot)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
