"""A character-level decoder-only transformer trained with cupyflash attention.

Pure CuPy (or NumPy) with every gradient written out by hand: token and
position embeddings, pre-LN blocks (causal multi-head self-attention through
``cupyflash.attention_vjp``, GELU MLP), a final LayerNorm and an output head
tied to the token embedding, softmax cross-entropy, and Adam.  It trains on
``examples/data/*.txt``.

    python examples/train_transformer.py                  # full preset on a GPU (~10 s on an H200); tiny on NumPy
    python examples/train_transformer.py --numpy          # the tiny preset on NumPy (a few seconds)
    python examples/train_transformer.py --preset full --numpy   # the full preset on NumPy (~20 min on 2 cores)
    python examples/train_transformer.py --gradcheck      # hand-written gradients vs finite differences
    python examples/train_transformer.py --attn-dtype bfloat16   # bfloat16 attention, float32 elsewhere
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time

import ml_dtypes
import numpy as np

import cupyflash

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float64": np.float64}
PRESETS = {
    # The corpus is 17 KB: past a few hundred steps this model memorizes it (on an H200 the
    # validation loss bottomed out near step 300 of a 2000-step run, then climbed).
    "full": dict(n_layer=4, n_embd=128, n_head=2, block=128, batch=32, steps=400, lr=2e-3, log_every=50),
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, block=32, batch=16, steps=60, lr=3e-3, log_every=20),
}
GELU_C = math.sqrt(2.0 / math.pi)


# --------------------------------------------------------------------------- layers: forward and backward

def layernorm(x, w, b, eps=1e-5):
    xc = x - x.mean(axis=-1, keepdims=True)
    rstd = ((xc * xc).mean(axis=-1, keepdims=True) + eps) ** -0.5
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dy, cache):
    xhat, rstd, w = cache
    dw = (dy * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
    db = dy.reshape(-1, dy.shape[-1]).sum(axis=0)
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dw, db


def gelu(x, xp):
    """tanh-approximate GELU; returns (y, t) with t = tanh(...) kept for the backward."""
    t = xp.tanh(GELU_C * (x + 0.044715 * x**3))
    return 0.5 * x * (1.0 + t), t


def gelu_backward(dy, x, t):
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3 * 0.044715 * x * x))


def linear_grads(x, dy):
    """dW and db of y = x @ W + b, summed over all leading axes."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return x2.T @ dy2, dy2.sum(axis=0)


def cross_entropy(logits, targets, xp):
    """Mean softmax cross-entropy and its gradient w.r.t. the logits."""
    v = logits.shape[-1]
    z = logits.reshape(-1, v)
    rows, t = xp.arange(z.shape[0]), targets.reshape(-1)
    z = z - z.max(axis=-1, keepdims=True)
    e = xp.exp(z)
    s = e.sum(axis=-1, keepdims=True)
    loss = (xp.log(s[:, 0]) - z[rows, t]).mean()
    dz = e / s
    dz[rows, t] -= 1.0
    return loss, (dz / z.shape[0]).reshape(logits.shape)


# --------------------------------------------------------------------------- the model

def init_params(cfg, vocab, xp, dtype, seed=0, std=0.02):
    rng = np.random.default_rng(seed)
    c, L = cfg["n_embd"], cfg["n_layer"]

    def normal(*shape, s=std):
        return rng.normal(0.0, s, shape)

    p = {"wte": normal(vocab, c), "wpe": normal(cfg["block"], c), "lnf_w": np.ones(c), "lnf_b": np.zeros(c)}
    for l in range(L):
        p.update({
            f"{l}.ln1_w": np.ones(c), f"{l}.ln1_b": np.zeros(c),
            f"{l}.w_qkv": normal(c, 3 * c), f"{l}.b_qkv": np.zeros(3 * c),
            f"{l}.w_o": normal(c, c, s=std / math.sqrt(2 * L)), f"{l}.b_o": np.zeros(c),
            f"{l}.ln2_w": np.ones(c), f"{l}.ln2_b": np.zeros(c),
            f"{l}.w_fc": normal(c, 4 * c), f"{l}.b_fc": np.zeros(4 * c),
            f"{l}.w_proj": normal(4 * c, c, s=std / math.sqrt(2 * L)), f"{l}.b_proj": np.zeros(c),
        })
    return {k: xp.asarray(v, dtype=dtype) for k, v in p.items()}


def block_forward(x, p, l, cfg, attn_dtype, xp):
    """One pre-LN block: x + attn(ln1(x)), then + mlp(ln2(.)).  Returns (y, cache)."""
    b, t, c = x.shape
    h, d = cfg["n_head"], c // cfg["n_head"]
    a_in, ln1 = layernorm(x, p[f"{l}.ln1_w"], p[f"{l}.ln1_b"])
    qkv = (a_in @ p[f"{l}.w_qkv"] + p[f"{l}.b_qkv"]).reshape(b, t, 3, h, d)
    # q, k, v are strided views of the packed projection (last axis contiguous).
    q, k, v = (qkv[:, :, i].astype(attn_dtype, copy=False) for i in range(3))
    att, attn_vjp = cupyflash.attention_vjp(q, k, v, causal=True)
    att = att.astype(x.dtype, copy=False).reshape(b, t, c)
    x = x + att @ p[f"{l}.w_o"] + p[f"{l}.b_o"]
    m_in, ln2 = layernorm(x, p[f"{l}.ln2_w"], p[f"{l}.ln2_b"])
    f = m_in @ p[f"{l}.w_fc"] + p[f"{l}.b_fc"]
    g, tanh_f = gelu(f, xp)
    y = x + g @ p[f"{l}.w_proj"] + p[f"{l}.b_proj"]
    return y, (a_in, ln1, attn_vjp, att, m_in, ln2, f, tanh_f, g)


def block_backward(dy, p, l, cache, grads, cfg, attn_dtype, xp):
    """Backward of block_forward: returns dx and writes the block's parameter gradients."""
    a_in, ln1, attn_vjp, att, m_in, ln2, f, tanh_f, g = cache
    b, t, c = dy.shape
    # MLP branch: y = x + gelu(ln2(x) @ W_fc + b_fc) @ W_proj + b_proj
    grads[f"{l}.w_proj"], grads[f"{l}.b_proj"] = linear_grads(g, dy)
    df = gelu_backward(dy @ p[f"{l}.w_proj"].T, f, tanh_f)
    grads[f"{l}.w_fc"], grads[f"{l}.b_fc"] = linear_grads(m_in, df)
    dx, grads[f"{l}.ln2_w"], grads[f"{l}.ln2_b"] = layernorm_backward(df @ p[f"{l}.w_fc"].T, ln2)
    dx = dx + dy
    # Attention branch: x = x_in + attention(split(ln1(x_in) @ W_qkv + b_qkv)) @ W_o + b_o
    grads[f"{l}.w_o"], grads[f"{l}.b_o"] = linear_grads(att, dx)
    datt = (dx @ p[f"{l}.w_o"].T).reshape(b, t, cfg["n_head"], c // cfg["n_head"])
    dq, dk, dv = attn_vjp(datt.astype(attn_dtype, copy=False))
    dqkv = xp.stack([dq, dk, dv], axis=2).astype(dy.dtype, copy=False).reshape(b, t, 3 * c)
    grads[f"{l}.w_qkv"], grads[f"{l}.b_qkv"] = linear_grads(a_in, dqkv)
    da, grads[f"{l}.ln1_w"], grads[f"{l}.ln1_b"] = layernorm_backward(dqkv @ p[f"{l}.w_qkv"].T, ln1)
    return dx + da


def forward(params, idx, cfg, attn_dtype, xp):
    """Logits (batch, seq, vocab) and everything the backward needs."""
    t = idx.shape[1]
    x = params["wte"][idx] + params["wpe"][:t]
    caches = []
    for l in range(cfg["n_layer"]):
        x, cache = block_forward(x, params, l, cfg, attn_dtype, xp)
        caches.append(cache)
    h, lnf = layernorm(x, params["lnf_w"], params["lnf_b"])
    return h @ params["wte"].T, (h, lnf, caches)  # output head tied to the token embedding


def loss_and_grads(params, idx, targets, cfg, attn_dtype, xp):
    logits, (h, lnf, caches) = forward(params, idx, cfg, attn_dtype, xp)
    loss, dlogits = cross_entropy(logits, targets, xp)
    grads = {}
    vocab = params["wte"].shape[0]
    dwte_head = dlogits.reshape(-1, vocab).T @ h.reshape(-1, h.shape[-1])  # from logits = h @ wte.T
    dx, grads["lnf_w"], grads["lnf_b"] = layernorm_backward(dlogits @ params["wte"], lnf)
    for l in reversed(range(cfg["n_layer"])):
        dx = block_backward(dx, params, l, caches[l], grads, cfg, attn_dtype, xp)
    onehot = (idx.reshape(-1, 1) == xp.arange(vocab)[None, :]).astype(dx.dtype)
    grads["wte"] = dwte_head + onehot.T @ dx.reshape(-1, dx.shape[-1])
    grads["wpe"] = xp.zeros_like(params["wpe"])
    grads["wpe"][: idx.shape[1]] = dx.sum(axis=0)
    return loss, grads


# --------------------------------------------------------------------------- optimisation

class Adam:
    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, clip=1.0):
        self.lr, self.betas, self.eps, self.clip, self.t = lr, betas, eps, clip, 0
        self.m = {k: p * 0 for k, p in params.items()}
        self.v = {k: p * 0 for k, p in params.items()}

    def step(self, params, grads, lr):
        """One update in place; gradients are first clipped to a global norm of ``clip``."""
        self.t += 1
        b1, b2 = self.betas
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        shrink = min(1.0, self.clip / (norm + 1e-12))
        for k, p in params.items():
            g = grads[k] * shrink
            self.m[k] *= b1
            self.m[k] += (1 - b1) * g
            self.v[k] *= b2
            self.v[k] += (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1**self.t)
            v_hat = self.v[k] / (1 - b2**self.t)
            p -= lr * m_hat / (v_hat**0.5 + self.eps)
        return norm


def learning_rate(step, steps, peak):
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- data and sampling

def load_corpus(data_dir=DATA_DIR):
    files = sorted(glob.glob(os.path.join(data_dir, "*.txt")))
    if not files:
        sys.exit(f"no *.txt files in {data_dir}")
    text = "\n".join(open(f, encoding="utf-8").read() for f in files)
    chars = sorted(set(text))
    data = np.array([chars.index(ch) for ch in text], dtype=np.int32)
    split = int(0.9 * len(data))
    return chars, data[:split], data[split:]


def get_batch(data, batch, block, rng, xp):
    start = rng.integers(0, len(data) - block - 1, size=batch)
    window = np.stack([data[s:s + block + 1] for s in start])
    return xp.asarray(window[:, :-1]), xp.asarray(window[:, 1:])


def sample(params, cfg, chars, prompt, n, attn_dtype, xp, rng, temperature=0.8):
    ids = [chars.index(ch) for ch in prompt if ch in chars] or [0]
    for _ in range(n):
        ctx = xp.asarray(np.array(ids[-cfg["block"]:], dtype=np.int32)[None])
        logits = forward(params, ctx, cfg, attn_dtype, xp)[0][0, -1]
        logits = np.asarray(logits.get() if hasattr(logits, "get") else logits, dtype=np.float64) / temperature
        probs = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(chars), p=probs / probs.sum())))
    return "".join(chars[i] for i in ids)


# --------------------------------------------------------------------------- gradient check

def gradcheck(seed=0, per_param=4, tol=1e-5):
    """Hand-written gradients vs central finite differences on a tiny float64 NumPy model."""
    cfg = dict(n_layer=2, n_embd=8, n_head=2, block=6)
    vocab, batch = 7, 2
    rng = np.random.default_rng(seed)
    # Larger-than-training init (and non-trivial LayerNorm affine) so every path carries gradient.
    params = init_params(cfg, vocab, np, np.float64, seed=seed, std=0.5)
    for k in params:
        if k.endswith(("ln1_w", "ln2_w", "lnf_w")):
            params[k] += rng.normal(0, 0.3, params[k].shape)
    idx = rng.integers(0, vocab, size=(batch, cfg["block"]))
    targets = rng.integers(0, vocab, size=(batch, cfg["block"]))

    def loss_fn():
        return float(loss_and_grads(params, idx, targets, cfg, np.float64, np)[0])

    _, grads = loss_and_grads(params, idx, targets, cfg, np.float64, np)
    worst, eps = 0.0, 1e-6
    for name, p in params.items():
        errors = []
        for flat in rng.choice(p.size, size=min(per_param, p.size), replace=False):
            i = np.unravel_index(flat, p.shape)
            saved = p[i]
            p[i] = saved + eps
            up = loss_fn()
            p[i] = saved - eps
            down = loss_fn()
            p[i] = saved
            numeric, analytic = (up - down) / (2 * eps), grads[name][i]
            errors.append(abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-6))
        worst = max(worst, max(errors))
        print(f"  {name:12s} max relative error {max(errors):.2e}")
    ok = worst < tol
    print(f"gradcheck {'PASSED' if ok else 'FAILED'}: worst relative error {worst:.2e} (tolerance {tol:.0e})")
    return ok


# --------------------------------------------------------------------------- main

def progress_bar(steps):
    """A tqdm bar when tqdm is installed and stderr is a terminal, else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, unit="step", leave=False) if sys.stderr.isatty() else None


def gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[2])
    p.add_argument("--preset", choices=list(PRESETS), help="model and schedule (default: full on a GPU, tiny on NumPy)")
    p.add_argument("--numpy", action="store_true", help="run on NumPy (default when no GPU)")
    p.add_argument("--gradcheck", action="store_true", help="check the gradients and exit")
    for name in ("steps", "n_layer", "n_embd", "n_head", "block", "batch", "log_every"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the preset's {name}")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="parameters and activations")
    p.add_argument("--attn-dtype", choices=list(DTYPES), help="dtype fed to attention (default: --dtype)")
    p.add_argument("--sample", type=int, default=None, help="characters to sample at the end")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.gradcheck:
        return 0 if gradcheck(args.seed) else 1
    if args.numpy or not gpu_available():
        xp = np
    else:
        import cupy as xp
    preset = args.preset or ("full" if xp is not np else "tiny")
    if args.preset is None and xp is np:
        why = "--numpy" if args.numpy else "no GPU visible to cupy (python -m cupyflash says what is missing)"
        print(f"{why}: the tiny preset on NumPy (--preset full trains the full model, ~20 min on 2 cores)")
    cfg = dict(PRESETS[preset])
    for key in cfg:
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    if cfg["n_embd"] % cfg["n_head"]:
        sys.exit("--n-embd must be a multiple of --n-head")
    dtype = DTYPES[args.dtype]
    attn_dtype = DTYPES[args.attn_dtype or args.dtype]

    chars, train, val = load_corpus()
    rng = np.random.default_rng(args.seed)
    params = init_params(cfg, len(chars), xp, dtype, seed=args.seed)
    n_params = sum(p.size for p in params.values())
    print(f"{xp.__name__}: {n_params / 1e6:.2f}M parameters, {cfg['n_layer']} layers, d_model {cfg['n_embd']}, "
          f"{cfg['n_head']} heads, context {cfg['block']}, batch {cfg['batch']}, "
          f"vocab {len(chars)}, {len(train) + len(val)} characters, attention in {np.dtype(attn_dtype).name}")

    opt = Adam(params, cfg["lr"])
    val_batches = [get_batch(val, cfg["batch"], cfg["block"], np.random.default_rng(1000 + i), xp) for i in range(4)]

    def val_loss():
        return np.mean([float(cross_entropy(forward(params, x, cfg, attn_dtype, xp)[0], y, xp)[0])
                        for x, y in val_batches])

    steps = cfg["steps"]
    bar = progress_bar(steps + 1)  # steps + 1 passes: the last one only logs
    running, start = [], time.perf_counter()
    last_line = start
    for step in range(steps + 1):
        x, y = get_batch(train, cfg["batch"], cfg["block"], rng, xp)
        loss, grads = loss_and_grads(params, x, y, cfg, attn_dtype, xp)
        running.append(float(loss))
        now = time.perf_counter()
        per_step = (now - start) / max(1, step)
        if step % cfg["log_every"] == 0 or step == steps:
            line = (f"step {step:5d} | loss {np.mean(running):.4f} | val {val_loss():.4f} | "
                    f"{1e3 * per_step:.1f} ms/step")
            if bar:
                bar.write(line)  # above the bar
            else:
                print(line, flush=True)
            running, last_line = [], now
        elif bar is None and now - last_line >= 10:  # without a bar, a progress line at most every 10 s
            print(f"  step {step}/{steps}, about {per_step * (steps - step):.0f} s left", flush=True)
            last_line = now
        if bar:
            bar.update()
        if step < steps:
            opt.step(params, grads, learning_rate(step, steps, cfg["lr"]))
    if bar:
        bar.close()
    n = args.sample if args.sample is not None else (40 if preset == "tiny" else 300)
    print("sample:", sample(params, cfg, chars, "The ", n, attn_dtype, xp, rng), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
