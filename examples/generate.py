"""Greedy text generation from the character model of train_transformer.py, with and without a KV cache.

Trains the model (train_transformer's layers and training step; a small preset on NumPy, its full
preset on a GPU), then generates the same continuation of a prompt twice:

* recomputing: every step runs the whole prefix through the model, ``cupyflash.attention`` over
  all of it;
* cached: the prompt fills a per-layer KV cache once, then every step runs only the newest token,
  ``cupyflash.attention_with_kvcache`` appending its k and v to the cache in place.

Greedy decoding makes both pick the same tokens; the script checks that they do and prints the
tokens per second of each.

    python examples/generate.py            # on a GPU if cupy sees one, else NumPy
    python examples/generate.py --numpy --steps 200 --prompt "The keeper"
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import cupyflash
import train_transformer as tt

PRESETS = {
    # train_transformer's tiny model with a longer context, so that the cache has a prefix to save
    # work on, and a smaller batch: trains in a few seconds on two cores
    "numpy": dict(tt.PRESETS["tiny"], block=96, batch=8, steps=150),
    "gpu": tt.PRESETS["full"],
}


def block_inference(x, p, l, cfg, attend, xp):
    """train_transformer's pre-LN block, forward only; ``attend(l, q, k, v)`` is layer l's attention."""
    b, t, c = x.shape
    h = cfg["n_head"]
    a_in, _ = tt.layernorm(x, p[f"{l}.ln1_w"], p[f"{l}.ln1_b"])
    qkv = (a_in @ p[f"{l}.w_qkv"] + p[f"{l}.b_qkv"]).reshape(b, t, 3, h, c // h)
    att = attend(l, *(qkv[:, :, i] for i in range(3))).astype(x.dtype, copy=False).reshape(b, t, c)
    x = x + att @ p[f"{l}.w_o"] + p[f"{l}.b_o"]
    m_in, _ = tt.layernorm(x, p[f"{l}.ln2_w"], p[f"{l}.ln2_b"])
    g, _ = tt.gelu(m_in @ p[f"{l}.w_fc"] + p[f"{l}.b_fc"], xp)
    return x + g @ p[f"{l}.w_proj"] + p[f"{l}.b_proj"]


def next_token(params, ids, start, cfg, attend, xp):
    """The most likely token after ``ids``, which sit at positions ``start ...``."""
    x = params["wte"][xp.asarray(np.array(ids, np.int32)[None])] + params["wpe"][start:start + len(ids)]
    for l in range(cfg["n_layer"]):
        x = block_inference(x, params, l, cfg, attend, xp)
    h, _ = tt.layernorm(x[:, -1], params["lnf_w"], params["lnf_b"])
    return int(xp.argmax(h @ params["wte"].T))


def generate_recomputing(params, cfg, prompt, n, attn_dtype, xp):
    def attend(l, q, k, v):
        return cupyflash.attention(*(x.astype(attn_dtype, copy=False) for x in (q, k, v)), causal=True)

    ids = list(prompt)
    for _ in range(n):
        ids.append(next_token(params, ids, 0, cfg, attend, xp))
    return ids[len(prompt):]


def generate_cached(params, cfg, prompt, n, attn_dtype, xp):
    c, h = cfg["n_embd"], cfg["n_head"]
    caches = [tuple(xp.zeros((1, cfg["block"], h, c // h), attn_dtype) for _ in range(2))
              for _ in range(cfg["n_layer"])]
    cached = 0  # positions already in the caches (a host int: no device read per step)

    def attend(l, q, k, v):
        q, k, v = (x.astype(attn_dtype, copy=False) for x in (q, k, v))
        return cupyflash.attention_with_kvcache(q, *caches[l], k, v, cache_seqlens=cached, causal=True)

    ids, new = list(prompt), list(prompt)  # the first step runs the whole prompt into the caches
    for _ in range(n):
        token = next_token(params, new, cached, cfg, attend, xp)
        cached += len(new)
        new = [token]
        ids.append(token)
    return ids[len(prompt):]


def train(cfg, vocab, data, attn_dtype, xp, seed):
    """train_transformer's training loop, without its logging; returns the parameters and the last loss."""
    rng = np.random.default_rng(seed)
    params = tt.init_params(cfg, vocab, xp, np.float32, seed=seed)
    opt = tt.Adam(params, cfg["lr"])
    for step in range(cfg["steps"]):
        x, y = tt.get_batch(data, cfg["batch"], cfg["block"], rng, xp)
        loss, grads = tt.loss_and_grads(params, x, y, cfg, attn_dtype, xp)
        opt.step(params, grads, tt.learning_rate(step, cfg["steps"], cfg["lr"]))
    return params, float(loss)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numpy", action="store_true", help="run on NumPy (default when no GPU)")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--prompt", default="The ", help="text to continue")
    p.add_argument("--tokens", type=int, help="characters to generate (default: up to the model's context)")
    p.add_argument("--attn-dtype", choices=list(tt.DTYPES), default="float32", help="dtype of q, k, v and the cache")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.numpy or not tt.gpu_available():
        xp = np
    else:
        import cupy as xp
    cfg = dict(PRESETS["numpy" if xp is np else "gpu"])
    if args.steps is not None:
        cfg["steps"] = args.steps
    attn_dtype = tt.DTYPES[args.attn_dtype]
    chars, train_data, _ = tt.load_corpus()
    prompt = [chars.index(ch) for ch in args.prompt if ch in chars] or [0]
    n = cfg["block"] - len(prompt) if args.tokens is None else args.tokens
    if not 0 < n <= cfg["block"] - len(prompt):
        sys.exit(f"--tokens: the prompt ({len(prompt)}) and the tokens must fit the context of {cfg['block']}")

    start = time.perf_counter()
    params, loss = train(cfg, len(chars), train_data, attn_dtype, xp, args.seed)
    print(f"{xp.__name__}: trained {cfg['steps']} steps in {time.perf_counter() - start:.1f} s, loss {loss:.3f}; "
          f"generating {n} characters after {args.prompt!r}, attention in {np.dtype(attn_dtype).name}")

    results = {}
    for name, generate in (("recomputing", generate_recomputing), ("kv cache", generate_cached)):
        start = time.perf_counter()
        tokens = generate(params, cfg, prompt, n, attn_dtype, xp)
        elapsed = time.perf_counter() - start
        results[name] = tokens
        print(f"{name:>12}: {n / elapsed:8.1f} tokens/s  {''.join(chars[i] for i in prompt + tokens)!r}")
    same = results["recomputing"] == results["kv cache"]
    print("same tokens:", "yes" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
