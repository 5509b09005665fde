"""Meta-learning (iMAML) for few-shot sine regression, against first-order MAML.

Each task is a sine wave `A sin(x + phase)` seen through 10 support and 10 query points.
iMAML adapts a small MLP to a task by solving the proximal inner problem

    phi*(theta) = argmin_phi  L_support(phi) + lam/2 * ||phi - theta||^2

with L-BFGS (`li.optimize`, `jax.vmap` over a batch of tasks) and learns the
meta-parameters `theta` with Adam on `L_query(phi*(theta))`; the meta-gradient comes from
implicit differentiation, not from unrolling the inner solver. First-order MAML (FOMAML)
takes a few gradient steps instead and ignores the second-order term.

Checks: one task's meta-gradient against float64 central differences; meta-training lowers
the held-out post-adaptation loss; iMAML ends below FOMAML on the same tasks.

Run: `python examples/meta_learning.py` (or `--quick`).
"""

import sys
import time
from pathlib import Path

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import lbfgs_implicit as li


QUICK = "--quick" in sys.argv
META_STEPS = 8 if QUICK else 300
TASKS_PER_BATCH = 16
TEST_BATCHES = 2 if QUICK else 4  # held-out tasks, in batches of 16
SHOTS = 10
LAM = 1.0  # proximal weight of iMAML
FO_STEPS, FO_LR = 5, 0.02  # FOMAML's inner gradient descent
# The plot goes to the docs unless `--plot-dir=DIR` is given (the tests use a temp dir).
PLOT_DIR = next(
    (Path(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--plot-dir=")),
    Path(__file__).resolve().parents[1] / "docs" / "pages" / "img",
)
IMG = PLOT_DIR / "meta_learning.png"


def init_mlp(key, sizes=(1, 32, 32, 1)):
    params = []
    for k, (m, n) in zip(jr.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        params.append({"w": jr.normal(k, (m, n)) * np.sqrt(1.0 / m), "b": jnp.zeros(n)})
    return params


def mlp(params, x):
    h = x[:, None]
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return (h @ params[-1]["w"] + params[-1]["b"])[:, 0]


def mse(params, x, y):
    return jnp.mean((mlp(params, x) - y) ** 2)


def sample_tasks(key, num):
    ka, kp, kx = jr.split(key, 3)
    amp = jr.uniform(ka, (num, 1), minval=0.1, maxval=5.0)
    phase = jr.uniform(kp, (num, 1), minval=0.0, maxval=jnp.pi)
    x = jr.uniform(kx, (num, 2 * SHOTS), minval=-5.0, maxval=5.0)
    y = amp * jnp.sin(x + phase)
    return (x[:, :SHOTS], y[:, :SHOTS]), (x[:, SHOTS:], y[:, SHOTS:])


def tree_sqdist(a, b):
    return sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def proximal_objective(phi, args):
    theta, (x, y) = args
    return mse(phi, x, y) + 0.5 * LAM * tree_sqdist(phi, theta)


inner_solver = li.LBFGS(max_steps=500, gtol=1e-6)


def imaml_adapt(theta, support):
    # Start the inner solve at theta; under vmap, throw=True would fire if any task failed,
    # so the outcome is returned and checked instead.
    sol = li.optimize(proximal_objective, theta, (theta, support), solver=inner_solver, throw=False)
    return sol.params, sol.result == li.RESULTS.successful


def imaml_task_loss(theta, support, query):
    phi, ok = imaml_adapt(theta, support)
    return mse(phi, *query), ok


def fomaml_adapt(theta, support):
    phi = theta
    for _ in range(FO_STEPS):
        grad = jax.grad(mse)(phi, *support)
        phi = jax.tree.map(lambda p, g: p - FO_LR * g, phi, grad)
    return phi


def fomaml_task_grad(theta, support, query):
    phi = fomaml_adapt(theta, support)
    # First-order MAML: the query gradient at the adapted point, taken as the
    # meta-gradient (d phi / d theta replaced by the identity).
    return jax.value_and_grad(mse)(phi, *query)


@jax.jit
def imaml_meta_grad(theta, support, query):
    def batch_loss(theta):
        losses, ok = jax.vmap(imaml_task_loss, in_axes=(None, 0, 0))(theta, support, query)
        return jnp.mean(losses), jnp.mean(ok)

    (loss, frac_ok), grad = jax.value_and_grad(batch_loss, has_aux=True)(theta)
    return loss, grad, frac_ok


@jax.jit
def fomaml_meta_grad(theta, support, query):
    losses, grads = jax.vmap(fomaml_task_grad, in_axes=(None, 0, 0))(theta, support, query)
    return jnp.mean(losses), jax.tree.map(lambda g: jnp.mean(g, 0), grads)


def evaluate(theta_imaml, theta_fomaml, test_tasks):
    """Mean post-adaptation query loss on held-out tasks (the meta-losses, gradients unused)."""
    li_loss = np.mean([imaml_meta_grad(theta_imaml, s, q)[0] for s, q in test_tasks])
    fo_loss = np.mean([fomaml_meta_grad(theta_fomaml, s, q)[0] for s, q in test_tasks])
    return float(li_loss), float(fo_loss)


def check_meta_gradient(theta, support, query, key):
    """Directional derivative of one task's meta-loss against central differences."""
    s1 = jax.tree.map(lambda a: a[0], support)
    q1 = jax.tree.map(lambda a: a[0], query)
    # Central differences with h = 1e-5 need solves to about 1e-11 for the asserted 1e-5.
    # Tighter is not reliably reachable: the 2-norm of this 1761-parameter gradient has a
    # rounding floor near 1e-13, and solves asked for 1e-12 end within a decade of it,
    # where the line search can no longer rank trials.
    tight = li.LBFGS(max_steps=2000, gtol=1e-11, gtol_l2=1e-11)

    def loss(theta):
        phi = li.optimize(proximal_objective, theta, (theta, s1), solver=tight).params
        return mse(phi, *q1)

    leaves, treedef = jax.tree.flatten(theta)
    keys = jr.split(key, len(leaves))
    direction = jax.tree.unflatten(treedef, [jr.normal(k, a.shape) for k, a in zip(keys, leaves)])
    # One compiled function serves the gradient and the shifted evaluations.
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    grad = value_and_grad(theta)[1]
    analytic = sum(
        jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
    )
    h = 1e-5
    plus, minus = (jax.tree.map(lambda t, d: t + c * h * d, theta, direction) for c in (1, -1))
    fd = (value_and_grad(plus)[0] - value_and_grad(minus)[0]) / (2 * h)
    rel_err = float(abs(analytic - fd) / abs(fd))
    print(f"meta-gradient vs central differences: {analytic:.10f} vs {fd:.10f}")
    print(f"relative error {rel_err:.1e}")
    assert rel_err < 1e-5, rel_err


def main():
    key = jr.PRNGKey(0)
    key, k_init, k_test, k_check = jr.split(key, 4)
    theta0 = init_mlp(k_init)
    test_tasks = [sample_tasks(k, TASKS_PER_BATCH) for k in jr.split(k_test, TEST_BATCHES)]

    check_meta_gradient(theta0, *sample_tasks(k_check, 1), k_check)

    optimiser = optax.adam(3e-3)
    theta_i, theta_f = theta0, theta0
    state_i, state_f = optimiser.init(theta_i), optimiser.init(theta_f)
    init_i, init_f = evaluate(theta0, theta0, test_tasks)
    print(f"before meta-training, test query MSE: iMAML {init_i:.4f}, FOMAML {init_f:.4f}")
    curve = {"step": [0], "imaml": [init_i], "fomaml": [init_f]}
    eval_every = META_STEPS if QUICK else META_STEPS // 10
    t_i = t_f = 0.0
    for step in range(1, META_STEPS + 1):
        key, k = jr.split(key)
        support, query = sample_tasks(k, TASKS_PER_BATCH)  # the same tasks for both methods
        start = time.perf_counter()
        _, grad_i, frac_ok = jax.block_until_ready(imaml_meta_grad(theta_i, support, query))
        t_i += time.perf_counter() - start
        start = time.perf_counter()
        _, grad_f = jax.block_until_ready(fomaml_meta_grad(theta_f, support, query))
        t_f += time.perf_counter() - start
        assert frac_ok == 1.0, f"{1 - frac_ok:.0%} of inner solves did not converge"
        updates, state_i = optimiser.update(grad_i, state_i)
        theta_i = optax.apply_updates(theta_i, updates)
        updates, state_f = optimiser.update(grad_f, state_f)
        theta_f = optax.apply_updates(theta_f, updates)
        if step % eval_every == 0:
            li_loss, fo_loss = evaluate(theta_i, theta_f, test_tasks)
            curve["step"].append(step)
            curve["imaml"].append(li_loss)
            curve["fomaml"].append(fo_loss)
            print(f"meta step {step:5d}: test query MSE iMAML {li_loss:.4f}, FOMAML {fo_loss:.4f}")
    print(
        f"meta-gradient time over {META_STEPS} steps (compiled before): iMAML {t_i:.1f} s, "
        f"FOMAML {t_f:.1f} s"
    )
    assert curve["imaml"][-1] < 0.95 * init_i, curve["imaml"]
    assert curve["imaml"][-1] < curve["fomaml"][-1], (curve["imaml"][-1], curve["fomaml"][-1])
    plot(curve)


def plot(curve):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(curve["step"], curve["imaml"], marker="o", ms=3, label="iMAML (L-BFGS + implicit)")
    ax.plot(curve["step"], curve["fomaml"], marker="s", ms=3, label=f"FOMAML ({FO_STEPS} steps)")
    ax.set_xlabel("meta step (Adam, 16 tasks per batch)")
    ax.set_ylabel("held-out query MSE after adaptation")
    ax.set_yscale("log")
    ax.set_title("Few-shot sine regression, 10 shots")
    ax.legend()
    fig.tight_layout()
    IMG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG, dpi=80)
    print(f"wrote {IMG}")


if __name__ == "__main__":
    main()
