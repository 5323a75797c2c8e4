"""Numba kernels for training the on-device MLP over one flat parameter vector.

Layer l maps widths[l] -> widths[l+1]; its weight is theta[w_off[l] : ...] viewed as (fan_in, fan_out)
and its bias theta[b_off[l] : ...]. Hidden layers use ReLU; the output is one logit (sigmoid + binary
cross-entropy) or one per class (softmax + cross-entropy). Every matrix product goes through `np.dot`,
which Numba lowers to BLAS gemm: that is what keeps wide layers at BLAS speed while the per-batch loop,
gathers and optimizer steps run compiled, with no Python between batches.

The kernels are dtype-generic (float32 for training, float64 for gradient checks) and allocate
nothing per batch: buffers are made once per call to `train_epochs`.

Compile options, and why they are safe here:
- nogil=True: a training call runs for seconds to minutes; holding the GIL that long would stall paho's
  network thread, so the broker would miss the device's keepalive and drop it mid-round. The kernels
  touch no Python object (arrays, scalars and np.dot only), so they can run without it.
- error_model="numpy": Numba's default ("python") guards every float division with a zero check that
  raises, which stops LLVM from vectorizing the loops (the Adam loop ran 4x slower). No divisor here
  can be zero (batch sizes >= 1, 1 - beta**t > 0 for beta < 1, sqrt(.) + eps > 0).
- fastmath=_FAST on the element-wise loops: contraction to FMA, reassociation, reciprocals, no signed
  zeros. Not "nnan"/"ninf": a diverging run must still produce NaN/inf so the trainer can report it.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.blas import preload_cython_blas

preload_cython_blas()  # before Numba sets up: it imports the BLAS bindings (see edge_runtime/blas.py)

from numba import njit  # noqa: E402

OPT_SGD = 0
OPT_ADAM = 1

_FAST = {"nsz", "arcp", "contract", "reassoc"}

# Output deltas smaller than this are written as 0. A row the model already fits that well cannot move a
# float32 parameter (even Adam's step is then below lr * 1e-13 because of eps), while its denormal
# products in the following gemms made whole epochs 3-4x slower on well-separated data.
_DELTA_FLUSH = 1e-20


@njit(cache=True, nogil=True, error_model="numpy")
def _buffer_offsets(widths: np.ndarray, batch: int) -> np.ndarray:
    """Start of each layer's (batch, width) block in the flat activation buffer; entry L+1 is its size."""
    n = widths.shape[0]
    off = np.zeros(n + 1, dtype=np.int64)
    for layer in range(n):
        off[layer + 1] = off[layer] + batch * widths[layer]
    return off


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)
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
        if fo == 1:  # a binary task's output layer: a dot per row beats a gemm call with n = 1
            for i in range(nb):
                z = A[i, 0] * W[0, 0]
                for k in range(1, fi):
                    z += A[i, k] * W[k, 0]
                Z[i, 0] = z
        else:
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


@njit(cache=True, nogil=True, error_model="numpy")
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
            # softplus(z) - y z and sigmoid(z) from one exp(-|z|), which cannot overflow.
            e = np.exp(-abs(z))
            total += sw[i] * (max(z, 0.0) - z * yi + np.log1p(e))
            p = 1.0 / (1.0 + e) if z >= 0 else e / (1.0 + e)
            d = sw[i] * (p - yi) / denom
            delta[i, 0] = d if abs(d) > _DELTA_FLUSH else 0.0
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
                d = sw[i] * (p - (1.0 if j == yi else 0.0)) / denom
                delta[i, j] = d if abs(d) > _DELTA_FLUSH else 0.0
    return total


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)
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
        W = theta[w_off[layer] : w_off[layer] + fi * fo].reshape(fi, fo)
        Dprev = deltas[a_off[layer] : a_off[layer] + nb * fi].reshape(nb, fi)
        if fo == 1:  # rank-1 products in loops: gemm calls with a dimension of 1 cost more than the work
            gW[:, 0] = 0
            gb[0] = 0
            for i in range(nb):
                d = D[i, 0]
                gb[0] += d
                for k in range(fi):
                    gW[k, 0] += A[i, k] * d
                if layer > 0:
                    for k in range(fi):
                        Dprev[i, k] = d * W[k, 0] if A[i, k] > 0 else 0
            continue
        np.dot(A.T, D, gW)
        for j in range(fo):
            gb[j] = 0
        for i in range(nb):
            for j in range(fo):
                gb[j] += D[i, j]
        if layer > 0:
            np.dot(D, W.T, Dprev)
            for i in range(nb):
                for j in range(fi):
                    if A[i, j] <= 0:
                        Dprev[i, j] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def _add_penalties(theta, grad, weight_mask, l2, mu, theta_global):
    """Add the gradients of (l2/2)||W||^2 and the FedProx term (mu/2)||theta - theta_global||^2."""
    for p in range(theta.shape[0]):
        grad[p] += l2 * weight_mask[p] * theta[p]
        if mu > 0:
            grad[p] += mu * (theta[p] - theta_global[p])


@njit(cache=True, nogil=True, error_model="numpy")
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


@njit(cache=True, nogil=True, error_model="numpy")
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


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)
def _adam_step(theta, grad, m1, m2, weight_mask, theta_global, h):
    """One Adam step with the L2 and FedProx gradients folded in, in one pass over the parameters.

    h holds the step's scalars in theta's dtype (see `train_epochs`), so a float32 run stays float32
    instead of widening every element to float64.
    """
    step_size, inv_c2, b1, one_b1, b2, one_b2, eps, l2, mu = h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]
    for p in range(theta.shape[0]):
        g = grad[p] + l2 * weight_mask[p] * theta[p] + mu * (theta[p] - theta_global[p])
        m1[p] = b1 * m1[p] + one_b1 * g
        m2[p] = b2 * m2[p] + one_b2 * g * g
        theta[p] -= step_size * m1[p] / (np.sqrt(m2[p] * inv_c2) + eps)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=_FAST)
def _sgd_step(theta, grad, m1, weight_mask, theta_global, h):
    """One heavy-ball SGD step (h = lr, momentum, l2, mu in theta's dtype), penalties folded in."""
    lr, momentum, l2, mu = h[0], h[1], h[7], h[8]
    for p in range(theta.shape[0]):
        g = grad[p] + l2 * weight_mask[p] * theta[p] + mu * (theta[p] - theta_global[p])
        m1[p] = momentum * m1[p] + g
        theta[p] -= lr * m1[p]


@njit(cache=True, nogil=True, error_model="numpy")
def train_epochs(
    theta,
    widths,
    w_off,
    b_off,
    X,
    x_mean,
    x_scale,
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

    X holds raw features: each gathered row is standardized on the fly, (x - x_mean) / x_scale exactly as
    `Standardizer.apply` computes it, which spares a full standardized copy of the table.
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
    # The optimizer's scalars, stored in theta's dtype: [step size, 1/(1 - beta2^t), beta1, 1 - beta1,
    # beta2, 1 - beta2, eps, l2, mu]; for SGD h[0], h[1] are lr and momentum.
    h = np.empty(9, dtype=theta.dtype)
    h[2], h[3], h[4], h[5], h[6], h[7], h[8] = beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, l2, mu
    step = 0
    for e in range(n_epochs):
        epoch_loss = 0.0
        for start in range(0, n, batch_size):
            nb = min(batch_size, n - start)
            Xb = acts[: nb * d].reshape(nb, d)
            for i in range(nb):
                r = perms[e, start + i]
                for j in range(d):
                    Xb[i, j] = (X[r, j] - x_mean[j]) / x_scale[j]
                yb[i] = y[r]
                sw[i] = class_weight[y[r]]
            logits = _forward(theta, widths, w_off, b_off, acts, a_off, nb)
            delta = deltas[a_off[L] : a_off[L] + nb * widths[L]].reshape(nb, widths[L])
            epoch_loss += _output_delta(logits, yb[:nb], sw[:nb], nb, delta)
            _backward(theta, widths, w_off, b_off, acts, deltas, a_off, nb, grad)
            step += 1
            if optimizer == OPT_ADAM:
                h[0] = lr / (1.0 - beta1**step)
                h[1] = 1.0 / (1.0 - beta2**step)
                _adam_step(theta, grad, m1, m2, weight_mask, theta_global, h)
            else:
                h[0], h[1] = lr, momentum
                _sgd_step(theta, grad, m1, weight_mask, theta_global, h)
        losses[e] = epoch_loss / n + penalty_value(theta, weight_mask, l2, mu, theta_global)
    return losses
