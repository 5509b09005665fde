"""What the user of an outer loop sees: outcomes that print their names, and a batch
that can be tallied."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lbfgs_implicit as li


def _quartic(x, a):
    return jnp.sum((x - a) ** 4)


# Two steps cannot bring a quartic's gradient to 1e-10 unless the start is the minimiser.
CAP = li.LBFGS(max_steps=2)
X0, AT_START, AWAY = jnp.zeros(3), jnp.zeros(3), jnp.array([1.0, 2.0, 3.0])


def test_results_print_their_names():
    assert str(li.RESULTS.successful) == "RESULTS.successful"
    assert repr(li.RESULTS.max_steps_reached) == "RESULTS.max_steps_reached"
    assert li.RESULTS.linesearch_failed.name == "linesearch_failed"
    assert "stopping test was met" in li.RESULTS[li.RESULTS.successful]
    sol = li.optimize(_quartic, X0, AWAY, solver=CAP, throw=False)
    assert str(sol.result) == "RESULTS.max_steps_reached"
    assert sol.result.name == "max_steps_reached"


def test_counts_over_a_vmapped_batch():
    batch = jnp.stack([AT_START, AWAY, AT_START])
    solve = jax.vmap(lambda a: li.optimize(_quartic, X0, a, solver=CAP, throw=False).result)
    result = solve(batch)
    assert result.counts() == {"successful": 2, "max_steps_reached": 1}
    assert str(result) == "RESULTS(shape (3,): successful=2, max_steps_reached=1)"
    np.testing.assert_array_equal(np.asarray(result == li.RESULTS.successful), [1, 0, 1])
    with pytest.raises(ValueError, match=r"needs a single result.*counts\(\)"):
        result.name
    with pytest.raises(TypeError, match=r"needs a finished result, but this one is traced"):
        jax.jit(lambda a: solve(a).counts())(batch)
