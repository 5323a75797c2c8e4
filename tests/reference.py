"""An independent plain-numpy implementation of the trainer's algorithm.

Written layer by layer from the math (no flat vector, no shared code with the kernels) so that
agreement with the Numba trainer means something. The benchmark also times it as "numpy".
"""

from __future__ import annotations

import itertools

import numpy as np


def unpack(theta: np.ndarray, widths: tuple[int, ...]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    Ws, bs, o = [], [], 0
    for fi, fo in itertools.pairwise(widths):
        Ws.append(theta[o : o + fi * fo].reshape(fi, fo).copy())
        o += fi * fo
        bs.append(theta[o : o + fo].copy())
        o += fo
    return Ws, bs


def pack(Ws: list[np.ndarray], bs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([x.ravel() for pair in zip(Ws, bs, strict=True) for x in pair])


def batch_loss_grads(
    Ws: list[np.ndarray], bs: list[np.ndarray], X: np.ndarray, y: np.ndarray, sw: np.ndarray
) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """Mean weighted cross-entropy over the batch and its gradients (no penalties)."""
    acts = [X]
    for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        z = acts[-1] @ W + b
        acts.append(np.maximum(z, 0) if i < len(Ws) - 1 else z)
    z = acts[-1]
    n = len(y)
    if z.shape[1] == 1:
        p = 1 / (1 + np.exp(-z[:, 0]))
        loss = np.sum(sw * (np.logaddexp(0, z[:, 0]) - y * z[:, 0])) / n
        d = (sw * (p - y) / n)[:, None]
    else:
        logp = z - z.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        onehot = np.eye(z.shape[1])[y]
        loss = -np.sum(sw * (logp * onehot).sum(1)) / n
        d = sw[:, None] * (np.exp(logp) - onehot) / n
    gWs, gbs = [None] * len(Ws), [None] * len(Ws)
    for i in range(len(Ws) - 1, -1, -1):
        gWs[i] = acts[i].T @ d
        gbs[i] = d.sum(0)
        if i > 0:
            d = (d @ Ws[i].T) * (acts[i] > 0)
    return float(loss), gWs, gbs  # type: ignore[return-value]


def train_reference(
    theta0: np.ndarray,
    widths: tuple[int, ...],
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-7,
    l2: float = 0.0,
    mu: float = 0.0,
    class_weight: np.ndarray | None = None,
    seed: int = 0,
    anchor: np.ndarray | None = None,
    dtype: type = np.float32,
) -> np.ndarray:
    """Mini-batch SGD-with-momentum or Adam over epochs in the seed's row order; returns the flat params."""
    X = X.astype(dtype)
    Ws, bs = unpack(theta0.astype(dtype), widths)
    anchor_W, anchor_b = unpack((theta0 if anchor is None else anchor).astype(dtype), widths)
    cw = np.ones(widths[-1] if widths[-1] > 1 else 2) if class_weight is None else class_weight
    params = Ws + bs
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(y)) for _ in range(epochs)]
    step = 0
    for e in range(epochs):
        for s in range(0, len(y), batch_size):
            idx = perms[e][s : s + batch_size]
            _, gW, gb = batch_loss_grads(Ws, bs, X[idx], y[idx], cw[y[idx]].astype(dtype))
            grads = [g + l2 * W + mu * (W - aW) for g, W, aW in zip(gW, Ws, anchor_W, strict=True)]
            grads += [g + mu * (b - ab) for g, b, ab in zip(gb, bs, anchor_b, strict=True)]
            step += 1
            for k, (p, g) in enumerate(zip(params, grads, strict=True)):
                if optimizer == "adam":
                    m1[k] = beta1 * m1[k] + (1 - beta1) * g
                    m2[k] = beta2 * m2[k] + (1 - beta2) * g * g
                    p -= lr * (m1[k] / (1 - beta1**step)) / (np.sqrt(m2[k] / (1 - beta2**step)) + eps)
                else:
                    m1[k] = momentum * m1[k] + g
                    p -= lr * m1[k]
    return pack(Ws, bs)
