import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lbfgs_implicit as li


def _search(linesearch, fn, x, p, step0):
    @jax.jit
    def run(x, p, step0):
        vg = jax.value_and_grad(fn)
        f, g = vg(x)
        return linesearch(vg, x, f, g, p, g @ p, step0)

    return run(x, p, jnp.asarray(step0))


def _quartic(x):
    return jnp.sum(x**4) + 0.5 * jnp.sum(x**2)


def _steep(x):
    # The unit step along -g overshoots by orders of magnitude.
    return jnp.sum(jnp.exp(3.0 * x) + jnp.exp(-3.0 * x))


def _nan_beyond(x):
    # Finite only on x < 1: a trial past it must be rejected, not accepted.
    return jnp.where(x[0] < 1.0, (x[0] - 0.9) ** 2 + jnp.sum(x[1:] ** 2), jnp.nan)


CASES = [
    (_quartic, [2.0, -1.0], 1.0),  # unit step overshoots: zoom
    (_quartic, [0.3, 0.2], 1e-3),  # tiny first step: bracketing must extrapolate
    (_steep, [1.5, 0.5], 1.0),
]


def _assert_strong_wolfe(ls, fn, x, p, out):
    """Check the accepted step against both strong Wolfe conditions, recomputed here."""
    assert bool(out.success)
    f0, g0 = jax.value_and_grad(fn)(x)
    a = float(out.step)
    f1, g1 = jax.value_and_grad(fn)(x + a * p)
    dg0 = float(g0 @ p)
    assert float(f1) <= float(f0) + ls.c1 * a * dg0
    assert abs(float(g1 @ p)) <= ls.c2 * abs(dg0)
    return f1, g1


@pytest.mark.parametrize("fn, x, step0", CASES)
def test_strong_wolfe_conditions_hold(fn, x, step0):
    ls = li.StrongWolfe()
    x = jnp.asarray(x)
    p = -jax.grad(fn)(x)
    out = _search(ls, fn, x, p, step0)
    f1, g1 = _assert_strong_wolfe(ls, fn, x, p, out)
    # The accepted value and gradient are returned, not recomputed by the caller.
    np.testing.assert_allclose(out.f, f1, rtol=1e-12)
    np.testing.assert_allclose(out.g, g1, rtol=1e-10)


@pytest.mark.parametrize("step0", [0.05, 1.0])  # the first trial accepted / a zoom
def test_strong_wolfe_returns_the_differences_for_the_pair(step0):
    # `s` and `y` come from inside the search's branches; they must be exactly the
    # differences the solver would otherwise form itself.
    x = jnp.asarray([2.0, -1.0])
    p = -jax.grad(_quartic)(x)
    out = _search(li.StrongWolfe(), _quartic, x, p, step0)
    assert (int(out.num_evals) == 1) == (step0 == 0.05)
    np.testing.assert_array_equal(out.s, out.x - x)
    np.testing.assert_array_equal(out.y, out.g - jax.grad(_quartic)(x))


@pytest.mark.parametrize("ls", [li.StrongWolfe(), li.Backtracking()], ids=["wolfe", "backtrack"])
def test_nonfinite_trials_rejected(ls):
    x = jnp.array([0.0, 0.5])
    p = jnp.array([50.0, -0.5])  # the unit step lands at x[0] = 50, in the NaN region
    out = _search(ls, _nan_beyond, x, p, 1.0)
    assert bool(out.success)
    assert np.isfinite(float(out.f)) and np.all(np.isfinite(np.asarray(out.x)))
    assert float(out.f) < float(_nan_beyond(x))
    assert float(out.x[0]) < 1.0


def test_backtracking_armijo_holds():
    ls = li.Backtracking()
    x = jnp.array([2.0, -1.0])
    f0, g0 = jax.value_and_grad(_quartic)(x)
    out = _search(ls, _quartic, x, -g0, 1.0)
    a = float(out.step)
    assert bool(out.success) and 0 < a < 1
    assert float(_quartic(x - a * g0)) <= float(f0) - ls.c1 * a * float(g0 @ g0)


def test_no_decrease_possible_reports_failure():
    # `p` is an ascent direction disguised by a wrong gradient: nothing along it helps.
    def fn(x):
        return jnp.sum(x**2)

    x = jnp.array([1.0, 1.0])

    @jax.jit
    def run(x):
        def vg(z):
            f, g = jax.value_and_grad(fn)(z)
            return f, -g  # wrong sign

        f, g = vg(x)
        p = -g  # "descent" according to the wrong gradient, ascent in truth
        return li.StrongWolfe()(vg, x, f, g, p, g @ p, jnp.asarray(1.0))

    out = run(x)
    assert not bool(out.success)
    np.testing.assert_array_equal(out.x, x)
    assert float(out.f) == 2.0
    assert int(out.num_evals) == li.StrongWolfe().max_evals


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"c1": 0.95}, "0 < c1 < c2 < 1"),
        ({"c2": 1.5}, "0 < c1 < c2 < 1"),
        ({"max_evals": 0}, ">= 1"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        li.StrongWolfe(**kwargs)


def _flat_f32(x):
    # 2 + 50 x^2 in float32 near x = 1e-6, where every change of value is below an ulp
    # of 2, plus one ulp of value noise on -8.5e-6 < x < -1e-6 (rounding noise of the
    # kind a sum of many float32 terms carries), which the gradient does not see.
    noise = jnp.where((x[0] > -8.5e-6) & (x[0] < -1e-6), jnp.spacing(jnp.float32(2.0)), 0.0)
    return jnp.float32(2.0) + jnp.float32(50.0) * jnp.sum(x**2) + jax.lax.stop_gradient(noise)


def test_unchanged_value_is_not_sufficient_decrease():
    # Along p = -g from x = 1e-6 the minimum is at a = 0.01. The unit step is too long
    # (slope +99 |g'p|); the zoom then tries a = 0.1, whose value equals f(x) exactly
    # with a slope of +9 |g'p|: far beyond the minimum. Armijo's `f + c1 a g'p` rounds to
    # `f` there, and the trial once counted as a decrease and became the bracket's low
    # end; the next trial, one ulp up from noise, became the high end, and the zoom
    # closed in on a bracket that excludes the minimum: the search failed.
    ls = li.StrongWolfe()
    x = jnp.array([1e-6], jnp.float32)
    g = jax.grad(_flat_f32)(x)
    out = _search(ls, _flat_f32, x, -g, jnp.float32(1.0))
    assert bool(out.success)
    slope = float(jax.grad(_flat_f32)(x - out.step * g) @ -g)
    assert abs(slope) <= ls.c2 * float(g @ g)


def _cancelling(x, big):
    # (q(x) + big) - big: the value is exactly 0.0 wherever q(x) < eps big / 2 (about
    # 1e-12 for big = 1e4), while the gradient, 2 x * weights, is exact: the terms cancel
    # the way ARWHEAD's (-4 x_i + 3) do at its minimum f = 0. `big` is passed as an
    # operand: as a constant, XLA would simplify the sum back to q(x).
    return (jnp.sum(jnp.array([1.0, 4.0]) * x**2) + big) - big


def test_zero_value_that_rounding_keeps_still_lets_the_slope_decide():
    # At f(x) = 0.0 the relative allowance approx_tol |f| is zero; the Newton step along
    # -g (a = 0.5 on the first coordinate) keeps the value at 0.0 and zeroes the slope.
    # It must be accepted on its first trial, not taken for a step that is too long
    # (the search then shrank it for all its 20 evaluations and failed).
    @jax.jit
    def run(x, big):
        vg = jax.value_and_grad(lambda z: _cancelling(z, big))
        f, g = vg(x)
        return f, li.StrongWolfe()(vg, x, f, g, -g, -(g @ g), jnp.asarray(0.5))

    f, out = run(jnp.array([1e-9, 0.0]), jnp.asarray(1e4))
    assert float(f) == 0.0
    assert bool(out.success) and int(out.num_evals) == 1
    np.testing.assert_allclose(out.x, 0.0, atol=1e-25)


def test_solve_reaches_gtol_where_values_round_to_zero():
    # The value is 0.0 from |x| ~ 1e-6 on, while the gradient must go down to 1e-10:
    # the last steps are judged by slopes alone. Closed form: the minimiser is 0.
    sol = li.optimize(_cancelling, jnp.array([1.0, -0.7]), jnp.asarray(1e4))
    assert sol.result == li.RESULTS.successful
    assert float(sol.stats["grad_norm"]) <= 1e-10
    np.testing.assert_allclose(sol.params, 0.0, atol=1e-10)
    # A quadratic in two variables: a handful of steps, each accepted on its first trial
    # or two (a failed search costs `max_evals` = 20).
    assert int(sol.stats["num_fun_evals"]) <= 15, sol.stats


def _exp_line(x):
    # exp(2x) - 10x: from x = 0 along +x the minimum is at ln(5)/2 = 0.80, and a
    # trial at x = 30 has a value of 1e26 with a slope of 2e26.
    return jnp.sum(jnp.exp(2.0 * x) - 10.0 * x)


def _cosh_line(x):
    # cosh(3x) - 6x: minimum at asinh(2)/3 = 0.48; at x = 30 the value is 4e38.
    return jnp.sum(jnp.cosh(3.0 * x) - 6.0 * x)


@pytest.mark.parametrize("fn", [_exp_line, _cosh_line], ids=["exp", "cosh"])
def test_far_overshoot_zooms_back_in_few_trials(fn):
    # A first trial 40-60x past the minimum of a steeply growing function. The cubic
    # through (0, f, f') and the trial's steep value and slope puts its minimiser high
    # in the bracket, so a zoom on the cubic alone shrinks the bracket by about a
    # third per trial: 8 and 9 evaluations here. The quadratic through f(0), f'(0) and
    # the trial's value lies near the minimum; the midpoint of the two (Moré & Thuente's
    # rule for a trial that was too long) reaches the Wolfe conditions in 4 and 5.
    ls = li.StrongWolfe()
    x = jnp.array([0.0])
    p = jnp.array([1.0])
    out = _search(ls, fn, x, p, 30.0)
    _assert_strong_wolfe(ls, fn, x, p, out)
    assert int(out.num_evals) <= 5, int(out.num_evals)
