"""Numba kernels for training the on-device MLP over one flat parameter vector.

Layer l maps widths[l] -> widths[l+1]; its weight is theta[w_off[l] : ...] viewed as (fan_in, fan_out)
and its bias theta[b_off[l] : ...]. Hidden layers use ReLU; the output is one logit (sigmoid + binary
cross-entropy) or one per class (softmax + cross-entropy). Every matrix product goes through `np.dot`,
which Numba lowers to BLAS gemm: that is what keeps wide layers at BLAS speed while the per-batch loop,
gathers and optimizer steps run compiled, with no Python between batches.

The kernels are dtype-generic (float32 for training, float64 for gradient checks) and allocate
nothing per batch: buffers are made once per call to `train_epochs`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OPT_SGD = 0
OPT_ADAM = 1


@njit(cache=True)
def _buffer_offsets(widths: np.ndarray, batch: int) -> np.ndarray:
    """Start of each layer's (batch, width) block in the flat activation buffer; entry L+1 is its size."""
    n = widths.shape[0]
    off = np.zeros(n + 1, dtype=np.int64)
    for layer in range(n):
        off[layer + 1] = off[layer] + batch * widths[layer]
    return off


@njit(cache=True)
def _forward(theta, widths, w_off, b_off, acts, a_off, nb):
    """Fill acts for layers 1..L from the input block at layer 0 (rows 0..nb). Returns the logits view."""
    n_layers = widths.shape[0] - 1
    for layer in range(n_layers):
        fi = widths[layer]
        fo = widths[layer + 1]
        A = acts[a_off[layer] : a_off[layer] + nb * fi].reshape(nb, fi)
        Z = acts[a_off[layer + 1] : a_off[layer + 1] + nb * fo].reshape(nb, fo)
        W = theta[w_off[layer] : w_off[layer] + fi * fo].reshape(fi, fo)
        b = theta[b_off[layer] : b_off[layer] + fo]
        np.dot(A, W, Z)
        relu = layer < n_layers - 1
        for i in range(nb):
            for j in range(fo):
                z = Z[i, j] + b[j]
                if relu and z < 0:
                    z = 0
                Z[i, j] = z
    fo = widths[n_layers]
    return acts[a_off[n_layers] : a_off[n_layers] + nb * fo].reshape(nb, fo)


@njit(cache=True)
def _output_delta(logits, y, sw, denom, delta):
    """Write dLoss/dlogits into delta and return the summed weighted loss of the rows.

    Loss per row is sw * cross-entropy; the batch loss is that sum divided by `denom` (the batch size).
    """
    nb, k = logits.shape
    total = 0.0
    if k == 1:
        for i in range(nb):
            z = logits[i, 0]
            yi = y[i]
            # softplus(z) - y z, written so that neither exp overflows.
            total += sw[i] * (max(z, 0.0) - z * yi + np.log1p(np.exp(-abs(z))))
            p = 1.0 / (1.0 + np.exp(-z))
            delta[i, 0] = sw[i] * (p - yi) / denom
    else:
        for i in range(nb):
            zmax = logits[i, 0]
            for j in range(1, k):
                zmax = max(zmax, logits[i, j])
            s = 0.0
            for j in range(k):
                s += np.exp(logits[i, j] - zmax)
            log_s = np.log(s)
            yi = y[i]
            total += sw[i] * (log_s - (logits[i, yi] - zmax))
            for j in range(k):
                p = np.exp(logits[i, j] - zmax - log_s)
                delta[i, j] = sw[i] * (p - (1.0 if j == yi else 0.0)) / denom
    return total


@njit(cache=True)
def _backward(theta, widths, w_off, b_off, acts, deltas, a_off, nb, grad):
    """Back-propagate the output delta (in deltas' last block) and write data gradients into grad."""
    n_layers = widths.shape[0] - 1
    for layer in range(n_layers - 1, -1, -1):
        fi = widths[layer]
        fo = widths[layer + 1]
        A = acts[a_off[layer] : a_off[layer] + nb * fi].reshape(nb, fi)
        D = deltas[a_off[layer + 1] : a_off[layer + 1] + nb * fo].reshape(nb, fo)
        gW = grad[w_off[layer] : w_off[layer] + fi * fo].reshape(fi, fo)
        gb = grad[b_off[layer] : b_off[layer] + fo]
        np.dot(A.T, D, gW)
        for j in range(fo):
            gb[j] = 0
        for i in range(nb):
            for j in range(fo):
                gb[j] += D[i, j]
        if layer > 0:
            W = theta[w_off[layer] : w_off[layer] + fi * fo].reshape(fi, fo)
            Dprev = deltas[a_off[layer] : a_off[layer] + nb * fi].reshape(nb, fi)
            np.dot(D, W.T, Dprev)
            for i in range(nb):
                for j in range(fi):
                    if A[i, j] <= 0:
                        Dprev[i, j] = 0


@njit(cache=True)
def _add_penalties(theta, grad, weight_mask, l2, mu, theta_global):
    """Add the gradients of (l2/2)||W||^2 and the FedProx term (mu/2)||theta - theta_global||^2."""
    for p in range(theta.shape[0]):
        grad[p] += l2 * weight_mask[p] * theta[p]
        if mu > 0:
            grad[p] += mu * (theta[p] - theta_global[p])


@njit(cache=True)
def penalty_value(theta, weight_mask, l2, mu, theta_global):
    """(l2/2)||W||^2 + (mu/2)||theta - theta_global||^2."""
    reg = 0.0
    prox = 0.0
    for p in range(theta.shape[0]):
        reg += weight_mask[p] * theta[p] * theta[p]
        if mu > 0:
            d = theta[p] - theta_global[p]
            prox += d * d
    return 0.5 * l2 * reg + 0.5 * mu * prox


@njit(cache=True)
def loss_and_grad(theta, widths, w_off, b_off, X, y, class_weight, weight_mask, l2, mu, theta_global):
    """Full-batch loss and gradient (the objective the trainer minimises), for checks and evaluation."""
    n = X.shape[0]
    a_off = _buffer_offsets(widths, n)
    acts = np.empty(a_off[-1], dtype=theta.dtype)
    deltas = np.empty(a_off[-1], dtype=theta.dtype)
    acts[: n * widths[0]] = X.ravel()
    sw = np.empty(n, dtype=theta.dtype)
    for i in range(n):
        sw[i] = class_weight[y[i]]
    logits = _forward(theta, widths, w_off, b_off, acts, a_off, n)
    L = widths.shape[0] - 1
    delta = deltas[a_off[L] : a_off[L] + n * widths[L]].reshape(n, widths[L])
    data_loss = _output_delta(logits, y, sw, n, delta) / n
    grad = np.zeros_like(theta)
    _backward(theta, widths, w_off, b_off, acts, deltas, a_off, n, grad)
    _add_penalties(theta, grad, weight_mask, l2, mu, theta_global)
    return data_loss + penalty_value(theta, weight_mask, l2, mu, theta_global), grad


@njit(cache=True)
def train_epochs(
    theta,
    widths,
    w_off,
    b_off,
    X,
    y,
    class_weight,
    weight_mask,
    perms,
    batch_size,
    optimizer,
    lr,
    momentum,
    beta1,
    beta2,
    eps,
    l2,
    mu,
    theta_global,
):
    """Run len(perms) epochs of mini-batch training in place on theta; returns each epoch's mean loss.

    perms[e] is epoch e's row order (drawn by the caller from its seed, so runs are reproducible and a
    reference implementation can replay them). The last batch of an epoch may be short.
    """
    n, d = X.shape
    n_params = theta.shape[0]
    n_epochs = perms.shape[0]
    L = widths.shape[0] - 1
    a_off = _buffer_offsets(widths, batch_size)
    acts = np.empty(a_off[-1], dtype=theta.dtype)
    deltas = np.empty(a_off[-1], dtype=theta.dtype)
    grad = np.empty(n_params, dtype=theta.dtype)
    m1 = np.zeros(n_params, dtype=theta.dtype)  # momentum buffer, or Adam's first moment
    m2 = np.zeros(n_params, dtype=theta.dtype)  # Adam's second moment
    yb = np.empty(batch_size, dtype=y.dtype)
    sw = np.empty(batch_size, dtype=theta.dtype)
    losses = np.empty(n_epochs, dtype=np.float64)
    step = 0
    for e in range(n_epochs):
        epoch_loss = 0.0
        for start in range(0, n, batch_size):
            nb = min(batch_size, n - start)
            Xb = acts[: nb * d].reshape(nb, d)
            for i in range(nb):
                r = perms[e, start + i]
                for j in range(d):
                    Xb[i, j] = X[r, j]
                yb[i] = y[r]
                sw[i] = class_weight[y[r]]
            logits = _forward(theta, widths, w_off, b_off, acts, a_off, nb)
            delta = deltas[a_off[L] : a_off[L] + nb * widths[L]].reshape(nb, widths[L])
            epoch_loss += _output_delta(logits, yb[:nb], sw[:nb], nb, delta)
            _backward(theta, widths, w_off, b_off, acts, deltas, a_off, nb, grad)
            _add_penalties(theta, grad, weight_mask, l2, mu, theta_global)
            step += 1
            if optimizer == OPT_ADAM:
                c1 = 1.0 - beta1**step
                c2 = 1.0 - beta2**step
                for p in range(n_params):
                    g = grad[p]
                    m1[p] = beta1 * m1[p] + (1.0 - beta1) * g
                    m2[p] = beta2 * m2[p] + (1.0 - beta2) * g * g
                    theta[p] -= lr * (m1[p] / c1) / (np.sqrt(m2[p] / c2) + eps)
            else:
                for p in range(n_params):
                    m1[p] = momentum * m1[p] + grad[p]
                    theta[p] -= lr * m1[p]
        losses[e] = epoch_loss / n + penalty_value(theta, weight_mask, l2, mu, theta_global)
    return losses
