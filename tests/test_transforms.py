"""`optimize` under jit, vmap, grad of vmap, and nested in another `optimize`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import lbfgs_implicit as li


RNG = np.random.default_rng(1)
N, D = 30, 4
X = jnp.asarray(RNG.normal(size=(N, D)))
Y = jnp.asarray(RNG.normal(size=N))
LAMS = jnp.array([0.05, 0.5, 2.0])


def ridge(w, lam):
    return 0.5 * jnp.mean((X @ w - Y) ** 2) + 0.5 * lam * jnp.sum(w**2)


def closed_form(lam):
    return jnp.linalg.solve(X.T @ X / N + lam * jnp.eye(D), X.T @ Y / N)


def loss(w):
    return jnp.sum(jnp.sin(w))


def test_jit_of_optimize_and_of_its_gradient():
    solve = jax.jit(lambda lam: li.optimize(ridge, jnp.zeros(D), lam).params)
    np.testing.assert_allclose(solve(0.5), closed_form(0.5), rtol=0, atol=2e-10)
    grad = jax.jit(jax.grad(lambda lam: loss(li.optimize(ridge, jnp.zeros(D), lam).params)))
    np.testing.assert_allclose(grad(0.5), jax.grad(lambda l: loss(closed_form(l)))(0.5), rtol=1e-8)


def test_vmap_over_args_and_over_x0():
    solve = jax.vmap(lambda lam: li.optimize(ridge, jnp.zeros(D), lam, throw=False))
    sols = solve(LAMS)
    assert np.all(np.asarray(sols.result == li.RESULTS.successful))
    # |x - x*| <= gtol / lambda_min = 1e-10 / 0.05.
    np.testing.assert_allclose(sols.params, jax.vmap(closed_form)(LAMS), rtol=0, atol=2e-9)
    # Different starts, same minimiser, with their own iteration counts.
    x0s = jnp.stack([jnp.zeros(D), jnp.ones(D), -3 * jnp.ones(D)])
    sols = jax.vmap(lambda x0: li.optimize(ridge, x0, 0.5, throw=False))(x0s)
    expected = jnp.broadcast_to(closed_form(0.5), (3, D))
    np.testing.assert_allclose(sols.params, expected, rtol=0, atol=2e-10)
    assert len(set(np.asarray(sols.stats["num_steps"]).tolist())) > 1


def test_vmap_reports_failures_per_element():
    def fn(w, lam):
        return ridge(w, lam) + 0.0 * jnp.log(lam)  # NaN value at x0 when lam < 0

    sols = jax.vmap(lambda lam: li.optimize(fn, jnp.zeros(D), lam, throw=False))(
        jnp.array([0.5, -1.0])
    )
    np.testing.assert_array_equal(sols.result == li.RESULTS.successful, [True, False])
    np.testing.assert_array_equal(sols.result == li.RESULTS.nonfinite, [False, True])


def test_vmap_of_grad_and_grad_of_vmap():
    def outer(lam):
        return loss(li.optimize(ridge, jnp.zeros(D), lam).params)

    reference = jax.vmap(jax.grad(lambda l: loss(closed_form(l))))(LAMS)
    np.testing.assert_allclose(jax.vmap(jax.grad(outer))(LAMS), reference, rtol=1e-8)

    # Meta-learning shape: one shared hyperparameter, a batch of tasks, summed losses.
    targets = jnp.asarray(RNG.normal(size=(3, D)))

    def task(w, args):
        lam, t = args
        return 0.5 * jnp.sum((w - t) ** 2) + 0.5 * lam * jnp.sum(w**2) + 0.1 * jnp.sum(w**4)

    def meta(lam):
        sols = jax.vmap(lambda t: li.optimize(task, jnp.zeros(D), (lam, t), throw=False))(targets)
        return jnp.sum(sols.params**2)

    def meta_fd(lam, eps=1e-5):
        return (meta(lam + eps) - meta(lam - eps)) / (2 * eps)

    np.testing.assert_allclose(jax.grad(meta)(0.3), meta_fd(0.3), rtol=1e-6)


def test_nested_optimize_bilevel():
    # Outer problem over log-lambda solved by L-BFGS; its objective solves the inner ridge
    # and is differentiated implicitly. The reference minimises the closed form.
    def outer_objective(log_lam, _):
        w = li.optimize(ridge, jnp.zeros(D), jnp.exp(log_lam[0])).params
        return 0.5 * jnp.mean((X[:10] @ w - Y[:10] + 0.3) ** 2)

    def reference_objective(log_lam, _):
        w = closed_form(jnp.exp(log_lam[0]))
        return 0.5 * jnp.mean((X[:10] @ w - Y[:10] + 0.3) ** 2)

    solver = li.LBFGS(gtol=1e-8)
    ours = li.optimize(outer_objective, jnp.zeros(1), None, solver=solver)
    ref = li.optimize(reference_objective, jnp.zeros(1), None, solver=solver)
    np.testing.assert_allclose(ours.params, ref.params, rtol=1e-6)
    assert ours.result == li.RESULTS.successful


def test_filter_jit_with_module_hyperparameters():
    class Model(eqx.Module):
        scale: jax.Array
        name: str = "ridge"

    def fn(w, model):
        return ridge(w, model.scale)

    @eqx.filter_jit
    @eqx.filter_grad
    def outer(model):
        return loss(li.optimize(fn, jnp.zeros(D), model).params)

    g = outer(Model(jnp.array(0.5)))
    np.testing.assert_allclose(g.scale, jax.grad(lambda l: loss(closed_form(l)))(0.5), rtol=1e-8)


def test_gradient_through_nested_optimize():
    # The outer argmin depends on `shift` through an outer solve whose objective itself
    # solves the inner ridge: differentiating it needs Hessian-vector products of an
    # objective that contains the inner solve's custom rule (reverse-over-reverse).
    def outer_objective(log_lam, shift):
        w = li.optimize(ridge, jnp.zeros(D), jnp.exp(log_lam[0])).params
        return 0.5 * jnp.mean((X[:10] @ w - Y[:10] + shift) ** 2) + 0.01 * log_lam[0] ** 2

    def reference_objective(log_lam, shift):
        w = closed_form(jnp.exp(log_lam[0]))
        return 0.5 * jnp.mean((X[:10] @ w - Y[:10] + shift) ** 2) + 0.01 * log_lam[0] ** 2

    solver = li.LBFGS(gtol=1e-9)

    def argmin(objective, shift):
        return li.optimize(objective, jnp.zeros(1), shift, solver=solver).params[0]

    ours = jax.grad(lambda s: argmin(outer_objective, s))(0.3)
    reference = jax.grad(lambda s: argmin(reference_objective, s))(0.3)
    assert float(ours) != 0.0
    np.testing.assert_allclose(ours, reference, rtol=1e-6)


def test_vmap_finished_elements_do_not_prolong_line_searches():
    # Under `vmap` the solver's loop steps every element until all are done, discarding
    # the steps of finished ones; their line searches must stop at the first trial
    # rather than keep the batch's search loop running. An element that failed at a
    # non-finite start would search to `max_evals` on every step of the other. Counted
    # on the host, once per element and evaluation, wasted elements included.
    calls = [0]

    def counted(x, a):
        jax.debug.callback(lambda _: calls.__setitem__(0, calls[0] + 1), x[0])
        rosen = jnp.sum(a * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
        return rosen + 0.0 * jnp.log(a)  # NaN for a < 0

    x0 = jnp.full(4, -1.2)
    solve = jax.jit(jax.vmap(lambda a: li.optimize(counted, x0, a, throw=False)))
    sols = jax.block_until_ready(solve(jnp.array([100.0, -1.0])))
    jax.effects_barrier()
    np.testing.assert_array_equal(sols.result == li.RESULTS.nonfinite, [False, True])
    own = int(sols.stats["num_fun_evals"][0])
    # Both elements pay every batched evaluation: twice the long solve's own, and at
    # most one more batched call for `sol.value` (without the fix: 1803 for own = 53).
    assert calls[0] <= 2 * own + 2, (calls[0], own)


def _imaml_tasks():
    # An iMAML inner problem in float32: a 1-40-40-1 tanh MLP fitted to 10 points of a
    # sine wave plus 1/2 ||phi - theta||^2. Tasks 81 and 106 of this draw of 128 are ones
    # whose float32 solves, alone or in a batch, depending on how the batch rounded
    # its matrix products, ended `linesearch_failed` at |g|_inf up to 9e-5 (the
    # line-search rounding fixed in `_sufficient_decrease`).
    f32 = jnp.float32
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    theta = []
    for k, (m, n) in zip(keys, [(1, 40), (40, 40), (40, 1)]):
        w = jax.random.normal(k, (m, n), f32) * f32(np.sqrt(1.0 / m))
        theta.append({"w": w, "b": jnp.zeros(n, f32)})
    ka, kp, kx = jax.random.split(jax.random.PRNGKey(1), 3)
    amp = jax.random.uniform(ka, (128, 1), f32, minval=0.1, maxval=5.0)
    phase = jax.random.uniform(kp, (128, 1), f32, minval=0.0, maxval=jnp.pi)
    x = jax.random.uniform(kx, (128, 10), f32, minval=-5.0, maxval=5.0)
    lanes = jnp.array([81, 106])
    return theta, x[lanes], (amp * jnp.sin(x + phase))[lanes]


def _imaml_inner(phi, args):
    theta, x, y = args
    h = x[:, None]
    for layer in phi[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"][None])
    fit = jnp.mean(((h @ phi[-1]["w"] + phi[-1]["b"][None])[:, 0] - y) ** 2)
    prox = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(theta)))
    return fit + 0.5 * prox


def test_float32_batch_and_single_solves_agree():
    theta, x, y = _imaml_tasks()

    def solve(x, y):
        sol = li.optimize(_imaml_inner, theta, (theta, x, y), throw=False)
        return sol.result == li.RESULTS.successful, sol.stats["grad_norm"]

    batch_ok, batch_g = jax.jit(jax.vmap(solve))(x, y)
    single = jax.jit(solve)
    for i in range(len(x)):
        ok, g = single(x[i], y[i])
        assert bool(ok) and bool(batch_ok[i]), (i, float(g), float(batch_g[i]))
