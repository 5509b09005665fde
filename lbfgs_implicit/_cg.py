"""Preconditioned conjugate gradients as a lineax solver.

A lineax solver rather than a bare loop, so `lineax.linear_solve` keeps providing the
derivative and transpose rules (reverse-over-reverse through `optimize` needs them).
Differences from `lineax.CG`, and why:

1. Convergence is `||r||_2 <= atol + rtol ||b||_2`, a statement about the whole
   residual, instead of an elementwise max-norm test in both `y` and `b`.
2. No dimension-dependent breakdown test: `lineax.CG` declares breakdown when
   `|p'Ap| <= 100 eps n |r'z|`; with a good preconditioner `p'Ap ~ r'z`, so in float32
   from n ~ 1e5 every step "breaks down". Here breakdown means `p'Ap <= 0` or non-finite
   (the operator is not positive definite on the Krylov space).
3. One operator product per step, also under `vmap` (no periodic true-residual
   recomputation, which `vmap` would turn into an extra product every step); the
   adjoint checks the true residual once at the end.
"""

from typing import Any

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx

from ._misc import tree_axpy, tree_dot, tree_norm2, tree_sub


class CG(lx.AbstractLinearSolver):
    """Preconditioned conjugate gradients for symmetric positive definite operators.

    Used by [`lbfgs_implicit.ImplicitAdjoint`][] by default; accepts the lineax options
    `preconditioner` (a positive definite operator) and `y0` (initial guess).

    **Arguments:**

    - `rtol`, `atol`: stop when $\\|b - Ay\\|_2 \\le$ `atol` + `rtol` $\\|b\\|_2$.
    - `max_steps`: iteration limit; `None` means `10 n`. Reaching it gives
      `lineax.RESULTS.max_steps_reached`.
    """

    rtol: float
    atol: float = 0.0
    max_steps: int | None = None

    def __check_init__(self):
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"CG needs rtol, atol >= 0, got {self.rtol!r}, {self.atol!r}.")
        if self.rtol == 0 and self.atol == 0 and self.max_steps is None:
            raise ValueError("CG needs a tolerance (rtol or atol > 0) or max_steps.")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"CG needs max_steps >= 0, got {self.max_steps!r}.")

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        return lx.linearise(operator)

    def compute(self, state, vector, options):
        operator = state
        structure = operator.in_structure()
        preconditioner = options.get("preconditioner", lx.IdentityLinearOperator(structure))
        size = sum(leaf.size for leaf in jtu.tree_leaves(vector))
        max_steps = 10 * size if self.max_steps is None else self.max_steps
        target = self.atol + self.rtol * tree_norm2(vector)

        if "y0" in options:
            y0 = options["y0"]
            r0 = tree_sub(vector, operator.mv(y0))
        else:
            # From zero the residual is the right-hand side: no product.
            y0 = jtu.tree_map(jnp.zeros_like, vector)
            r0 = vector
        z0 = preconditioner.mv(r0)
        init = (y0, r0, z0, tree_dot(r0, z0), jnp.zeros((), jnp.int32), jnp.array(False))

        def cond(carry):
            _, r, _, gamma, k, broke = carry
            return (tree_norm2(r) > target) & (k < max_steps) & ~broke & (gamma > 0)

        def body(carry):
            y, r, p, gamma, k, _ = carry
            ap = operator.mv(p)
            pap = tree_dot(p, ap)
            broke = ~(pap > 0) | ~jnp.isfinite(pap)
            alpha = jnp.where(broke, 0, gamma / jnp.where(broke, 1, pap))
            y = tree_axpy(alpha, p, y)
            k = k + 1
            r = tree_axpy(-alpha, ap, r)
            z = preconditioner.mv(r)
            gamma_new = tree_dot(r, z)
            beta = gamma_new / jnp.where(gamma > 0, gamma, 1)
            p = tree_axpy(beta, p, z)
            return y, r, p, gamma_new, k, broke

        y, r, _, _, num_steps, broke = lax.while_loop(cond, body, init)
        converged = tree_norm2(r) <= target
        result = lx.RESULTS.where(
            broke,
            lx.RESULTS.breakdown,
            lx.RESULTS.where(converged, lx.RESULTS.successful, lx.RESULTS.max_steps_reached),
        )
        if self.max_steps is not None and self.rtol == 0 and self.atol == 0:
            # A fixed number of steps was asked for (a refinement), not convergence.
            result = lx.RESULTS.where(broke, lx.RESULTS.breakdown, lx.RESULTS.successful)
        return y, result, {"num_steps": num_steps}

    def transpose(self, state, options):
        transposed = {}
        if "preconditioner" in options:
            transposed["preconditioner"] = options["preconditioner"].transpose()
        return state.transpose(), transposed

    def conj(self, state, options):
        conjugated = {}
        if "preconditioner" in options:
            conjugated["preconditioner"] = lx.conj(options["preconditioner"])
        return lx.conj(state), conjugated

    def assume_full_rank(self):
        return True
