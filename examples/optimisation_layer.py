"""An optimisation layer inside an Equinox model, trained end to end with optax.

The model denoises piecewise-constant signals. A small convolutional network looks at the
noisy signal `y` and predicts a non-negative weight for every pair of neighbours; the
layer then outputs the minimiser of a smoothed total-variation energy

    z*(y, theta) = argmin_z  1/2 ||z - y||^2 + sum_i w_i(y, theta) sqrt((z_{i+1} - z_i)^2 + delta^2)

computed by `li.optimize` (under `jax.vmap` over the batch). Training differentiates the
loss `||z* - clean||^2` through the argmin by the implicit function theorem, into the
network's parameters. The baseline is the same layer with one learned weight shared by
all neighbours (plain smoothed TV).

Checks: the gradient of the loss with respect to all model parameters, along a random
direction, against float64 central differences; the learned model's test error is far
below the noise level, and below the untrained model's and the plain-TV baseline's.

Run: `python examples/optimisation_layer.py` (or `--quick`).
"""

import sys
import time
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import lbfgs_implicit as li


QUICK = "--quick" in sys.argv
TRAIN_STEPS = 30 if QUICK else 300
BATCH = 16
LENGTH = 64
NOISE = 0.3
# The plot goes to the docs unless `--plot-dir=DIR` is given (the tests use a temp dir).
PLOT_DIR = next(
    (Path(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--plot-dir=")),
    Path(__file__).resolve().parents[1] / "docs" / "pages" / "img",
)
IMG = PLOT_DIR / "optimisation_layer.png"


def parameter(value):
    """A strongly typed float64 scalar leaf.

    `jnp.asarray(0.05)` is weakly typed, and the first optax update returns it strongly
    typed: `train_step` would be traced and compiled a second time at step 1.
    """
    return jnp.asarray(value, dtype=jnp.float64)


def sample_signals(key, num):
    """Piecewise-constant signals with 2 to 6 jumps, and their noisy versions."""
    k_jumps, k_levels, k_noise, k_num = jr.split(key, 4)
    positions = jnp.arange(LENGTH)
    num_jumps = jr.randint(k_num, (num, 1), 2, 7)
    jumps = jr.randint(k_jumps, (num, 6), 1, LENGTH)
    active = jnp.arange(6)[None, :] < num_jumps
    segment = jnp.sum(active[:, :, None] & (positions[None, None, :] >= jumps[:, :, None]), 1)
    levels = jr.uniform(k_levels, (num, 7), minval=-2.0, maxval=2.0)
    clean = jnp.take_along_axis(levels, segment, axis=1)
    noisy = clean + NOISE * jr.normal(k_noise, clean.shape)
    return noisy, clean


def energy(z, args):
    y, weights, delta = args
    dz = jnp.diff(z)
    return 0.5 * jnp.sum((z - y) ** 2) + jnp.sum(weights * jnp.sqrt(dz**2 + delta**2))


class ArgminLayer(eqx.Module):
    """Output the minimiser of `energy` over `z`, started from the noisy signal."""

    log_delta: jax.Array
    solver: li.LBFGS = li.LBFGS(max_steps=1000, gtol=1e-8)

    def __call__(self, y, weights):
        delta = jnp.exp(self.log_delta)
        # Under vmap, throw=True would fire if any element failed: return the outcome.
        sol = li.optimize(energy, y, (y, weights, delta), solver=self.solver, throw=False)
        return sol.params, sol.result == li.RESULTS.successful


class AdaptiveTV(eqx.Module):
    """Predict one weight per neighbour pair from the noisy signal, then denoise."""

    conv1: eqx.nn.Conv1d
    conv2: eqx.nn.Conv1d
    layer: ArgminLayer

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.conv1 = eqx.nn.Conv1d(1, 8, kernel_size=5, padding=2, key=k1)
        self.conv2 = eqx.nn.Conv1d(8, 1, kernel_size=5, padding=2, key=k2)
        self.layer = ArgminLayer(jnp.log(parameter(0.05)))

    def __call__(self, y):
        features = jnp.abs(jnp.diff(y))[None, :]
        weights = jax.nn.softplus(self.conv2(jnp.tanh(self.conv1(features))))[0]
        return self.layer(y, weights)


class PlainTV(eqx.Module):
    """The same layer with one learned weight for every neighbour pair."""

    log_weight: jax.Array
    layer: ArgminLayer

    def __init__(self):
        self.log_weight = jnp.log(parameter(0.3))
        self.layer = ArgminLayer(jnp.log(parameter(0.05)))

    def __call__(self, y):
        return self.layer(y, jnp.full(LENGTH - 1, jnp.exp(self.log_weight)))


def loss_fn(model, noisy, clean):
    denoised, ok = jax.vmap(model)(noisy)
    return jnp.mean((denoised - clean) ** 2), jnp.mean(ok)


@eqx.filter_jit
def train_step(model, opt_state, noisy, clean, optimiser):
    (loss, frac_ok), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, noisy, clean)
    updates, opt_state = optimiser.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss, frac_ok


@eqx.filter_jit
def evaluate(model, noisy, clean):
    """Test MSE and the denoised signals, in one compiled program per model type."""
    denoised, _ = jax.vmap(model)(noisy)
    return jnp.mean((denoised - clean) ** 2), denoised


def check_gradient(model, noisy, clean, key):
    """Directional derivative of the loss against central differences, all parameters."""
    tight = li.LBFGS(max_steps=5000, gtol=1e-13, gtol_l2=1e-13)
    model = eqx.tree_at(lambda m: m.layer.solver, model, tight)
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    direction = jax.tree.unflatten(
        treedef, [jr.normal(k, a.shape) for k, a in zip(jr.split(key, len(leaves)), leaves)]
    )

    def loss(params):
        return loss_fn(eqx.combine(params, static), noisy, clean)[0]

    # One compiled function serves the gradient and the shifted evaluations.
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    grad = value_and_grad(params)[1]
    analytic = sum(
        jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
    )
    h = 1e-5
    plus, minus = (jax.tree.map(lambda p, d: p + c * h * d, params, direction) for c in (1, -1))
    fd = (value_and_grad(plus)[0] - value_and_grad(minus)[0]) / (2 * h)
    rel_err = float(abs(analytic - fd) / abs(fd))
    print(f"directional derivative: implicit {analytic:.10f}, central differences {fd:.10f}")
    print(f"relative error {rel_err:.1e}")
    assert rel_err < 1e-5, rel_err


def train(model, key, label):
    optimiser = optax.adam(1e-2)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))
    losses = []
    start = time.perf_counter()
    for step in range(TRAIN_STEPS):
        key, k = jr.split(key)
        noisy, clean = sample_signals(k, BATCH)
        model, opt_state, loss, frac_ok = train_step(model, opt_state, noisy, clean, optimiser)
        assert frac_ok == 1.0, f"{1 - frac_ok:.0%} of the inner solves failed"
        losses.append(float(loss))
        if step % max(TRAIN_STEPS // 5, 1) == 0 or step == TRAIN_STEPS - 1:
            print(f"{label} step {step:4d}: training MSE {loss:.5f}")
    print(f"{label}: {TRAIN_STEPS} steps in {time.perf_counter() - start:.1f} s (with compilation)")
    return model, losses


def main():
    key = jr.PRNGKey(0)
    k_model, k_check, k_test, k_train = jr.split(key, 4)
    test_noisy, test_clean = sample_signals(k_test, 64)
    model = AdaptiveTV(k_model)

    check_gradient(model, *sample_signals(k_check, 4), k_check)

    noise_mse = float(jnp.mean((test_noisy - test_clean) ** 2))
    init_mse = float(evaluate(model, test_noisy, test_clean)[0])
    model, losses = train(model, k_train, "adaptive TV")
    plain, plain_losses = train(PlainTV(), k_train, "plain TV")
    final_mse, denoised = evaluate(model, test_noisy, test_clean)
    plain_mse, plain_denoised = evaluate(plain, test_noisy, test_clean)
    final_mse, plain_mse = float(final_mse), float(plain_mse)
    print(
        f"test MSE: noisy input {noise_mse:.4f}, untrained {init_mse:.4f}, "
        f"plain TV {plain_mse:.4f}, adaptive TV {final_mse:.4f}"
    )
    assert final_mse < 0.5 * noise_mse, (final_mse, noise_mse)
    assert final_mse < init_mse, (final_mse, init_mse)
    assert final_mse < plain_mse, (final_mse, plain_mse)
    plot(losses, plain_losses, test_noisy[0], test_clean[0], plain_denoised[0], denoised[0])


def plot(losses, plain_losses, noisy, clean, plain_denoised, denoised):
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.plot(losses, label="adaptive TV (conv net + argmin layer)")
    ax1.plot(plain_losses, label="plain TV (one weight)")
    ax1.set_yscale("log")
    ax1.set_xlabel("training step (Adam)")
    ax1.set_ylabel("training MSE")
    ax1.legend()
    ax2.plot(np.asarray(noisy), ".", ms=3, color="0.6", label="noisy")
    ax2.plot(np.asarray(clean), "k-", lw=1, label="clean")
    ax2.plot(np.asarray(plain_denoised), lw=1.2, label="plain TV")
    ax2.plot(np.asarray(denoised), lw=1.2, label="adaptive TV")
    ax2.set_xlabel("position")
    ax2.set_title("A test signal")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    IMG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG, dpi=80)
    print(f"wrote {IMG}")


if __name__ == "__main__":
    main()
