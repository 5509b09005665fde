"""Gradients through the solve by the implicit function theorem.

At the solution, $F(x^*, \\theta) = \\nabla_x f(x^*, \\theta) = 0$. For a cotangent $v$
on $x^*$ the backward pass solves $H w = v$ with $H = \\nabla^2_{xx} f(x^*, \\theta)$
and returns $\\bar\\theta = -(\\partial_\\theta \\nabla_x f(x^*, \\theta))^\\top w$. It is
implemented as a custom JVP, whose tangent $\\dot x = -H^{-1} (\\partial_\\theta \\nabla_x f)
\\dot\\theta$ JAX transposes for reverse mode. An adjoint is the strategy for the linear
solve; the rule around the solve is shared.
"""

import abc
import math
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.extend
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, PyTree

from ._box import active_masks
from ._cg import CG
from ._history import (
    apply_block_inverse,
    block_inverse,
    block_split,
    BlockInverse,
    combine_pairs,
    inverse_hessian_operator,
    memory_of,
)
from ._misc import (
    coarsest_dtype,
    eps,
    EXACT,
    explicit_sharding,
    python_number,
    replay,
    tree_allfinite,
    tree_axpy,
    tree_dot,
    tree_neg,
    tree_norm2,
    tree_norm_inf,
    tree_scale,
    tree_sub,
    tree_where,
)
from ._solution import check_can_raise, raise_in_program, RESULTS
from ._solver import iterate


_ITERATIVE = (CG, lx.CG, lx.GMRES, lx.BiCGStab)


def default_tolerance(dtype) -> float:
    """CG tolerance of the default backward solve: $\\varepsilon^{2/3}$ of `dtype`.

    `3.7e-11` in float64, `2.4e-5` in float32, `3.9e-2` in bfloat16 (the same power as
    the forward `gtol`): tight enough that the linear solve does not limit the
    hypergradient's accuracy.
    """
    return eps(dtype) ** (2 / 3)


def failure_tolerance(dtype) -> float:
    """Relative residual above which a backward solve counts as failed: $\\sqrt{\\varepsilon}$.

    The solve is judged by its true residual, not by whether the iterative solver met
    its own tolerance: in float32, CG on large problems stagnates a little above
    `default_tolerance` with an answer that is as good as the precision allows, while
    a singular or indefinite Hessian leaves a residual of order one.
    """
    return eps(dtype) ** 0.5


class AbstractAdjoint(eqx.Module):
    """How the backward pass solves $H w = v$ at the solution.

    Subclasses set `exact`: whether the answer is meant to be $H^{-1} v$ (then the
    backward pass also checks that the Hessian does not change too much between the
    returned point and the minimiser, see `RESULTS.backward_failed`).
    """

    exact: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def solve(
        self,
        hessian: lx.AbstractLinearOperator,
        inverse_approx: lx.AbstractLinearOperator,
        v: PyTree[Array],
    ) -> tuple[PyTree[Array], RESULTS, dict[str, Array]]:
        """Return `(w, result, stats)`, with `w` approximately `hessian^{-1} v`.

        `result` is `RESULTS.backward_failed` when `w` cannot be trusted; `stats` has at
        least `num_steps`.

        `inverse_approx` is the L-BFGS inverse-Hessian approximation of the forward solve
        (stop-gradiented, symmetric positive definite).

        It runs inside `jax.lax.custom_linear_solve`, for tangents and (transposed) for
        cotangents alike, and is never differentiated: `w` must be a linear function of
        `v` (as any Krylov or direct solve, or an approximate inverse, is).
        """


class ImplicitAdjoint(AbstractAdjoint):
    """Exact implicit differentiation with a matrix-free Hessian (the default).

    Solves $(H + \\lambda I) w = v$ with Hessian-vector products (reverse-over-reverse,
    linearised once at the solution, so `fn` may itself call `optimize` or other
    custom-VJP functions), by default with [`lbfgs_implicit.CG`][], using the forward
    pass's L-BFGS memory only where that can pay (below).

    The memory's all-pairs inverse (unbounded solves with an iterative solver):

    1. The pairs $(s_i, y_i)$ define $P_\\sigma$, one BFGS update by all of them at
       once from $\\sigma I$: $P_\\sigma y_i = s_i$ for every pair (for the L-BFGS
       inverse $H_k$ only the newest), so where the pairs are curvature of $H$
       $P_\\sigma H$ is the identity on their span. A Hessian-vector product fits
       $\\sigma$ to the rest of the spectrum (the Rayleigh quotient of the part of $v$
       the pairs do not describe).
    2. CG starts from $P_\\sigma v$, whose exact residual comes from that product and
       one more. If the start leaves at most half of $v$'s residual, CG is
       preconditioned by $P_\\sigma$; otherwise it runs unpreconditioned (from zero if
       the start is worse than zero). The choice is made once, before the loop.

    The default (`all_pairs=None`) does this only where a product with the memory is
    estimated to cost at most a tenth of a Hessian-vector product (`MEMORY_COST`;
    estimated when tracing, from both jaxprs: one unit per operation plus its
    arithmetic), so that where the memory describes nothing the set-up is a few steps'
    worth and every step costs at most 10% more; elsewhere it runs plain CG from zero,
    as `precondition=False`. Where Hessian-vector products cost microseconds (small or
    sparse problems, small networks on a CPU) the memory's fixed costs exceed what it
    can save: measured with `python -m benchmarks.preconditioner`
    (`benchmarks/results/preconditioner.json`, medians), `all_pairs=True` took 1 CG
    step against 9 on `lam I` + rank 8 and 44 against 66 on the iMAML inner problem,
    yet 1.04x and 1.09x of plain CG's time. On a ridge with five strong common
    factors (n = 2000, dense data) the default takes 45 CG steps against 88, 0.58x of
    plain CG's time (`--rounds 7 --only '5 common,smoothing,logistic,lam I + rank
    8,iMAML'`), and on `lam I` + rank 8 from 4000 dense rows (where the memory
    describes the Hessian and its products are dear) 2 against 8, 0.64x (`--rounds 9
    --only 'dense rows'`): its set-up and the two checks below cost four products,
    plain CG's 8 steps and the checks 10.

    **Arguments:**

    - `linear_solver`: any lineax solver. `None` (default) is
      [`lbfgs_implicit.CG`][] with `rtol` $\\varepsilon^{2/3}$ (`3.7e-11` in float64,
      `2.4e-5` in float32) and at most `min(10 n, 10000)` steps. Dense solvers
      (`lineax.Cholesky()`, `lineax.LU()`) materialise $H$ (fine for small n);
      `lineax.GMRES` handles indefinite Hessians.
    - `precondition`: use the memory as above (its start for CG, GMRES and BiCGStab,
      its preconditioner for CG). Default `True`; `False` is plain CG from zero.
    - `memory_preconditioner`: also precondition every CG step by the L-BFGS inverse
      Hessian $H_k$. Default `False`: $H_k$ satisfies only the newest pair's secant
      equation, and on Hessians with a few outlying eigenvalues it costs steps (114
      against 88 on the factor ridge).
    - `all_pairs`: `True` uses the all-pairs inverse as above whatever the costs,
      `False` starts plain CG from $H_k v$, `None` (default) chooses by cost as above.
    - `damping`: $\\lambda \\ge 0$ added to the Hessian's diagonal, for singular
      Hessians (it changes the gradient: it is then that of a proximal-regularised
      problem). Default `0.0`.

    The answer is accepted only if it is finite and, for solvers that assume full rank,
    its relative residual $\\|(H + \\lambda I) w - v\\|_2 / \\|v\\|_2$ is at most
    $\\sqrt{\\varepsilon}$; otherwise the backward pass fails with
    `RESULTS.backward_failed`. Least-squares solvers (`lineax.SVD()`) give the
    least-norm answer for singular Hessians and are accepted when finite.

    It is also rejected at a degenerate minimiser (one where the Hessian vanishes, as
    for $x^4$), which no residual shows: one more Hessian-vector product, at the Newton
    estimate $x_k - H_k \\nabla f(x_k)$ of the minimiser, measures how much $H w$
    changes between the returned point and the minimiser, and more than 10% (see
    `degenerate_tolerance`) means the implicit function theorem's linearisation does not
    hold at the returned point. `check_degenerate=False` skips this test, for objectives
    known to have a positive definite Hessian at their minimiser (a strongly convex
    regulariser, as in iMAML): one linearisation of the gradient and one
    Hessian-vector product less per backward solve, and a slightly smaller program
    (the test applies the forward pass's memory once; with the default CG its
    linearisation and product are CG's own, in a loop of two turns around the steps).
    Compiling the MLP hypergradient of
    `python -m benchmarks.compile_mlp` (`benchmarks/results/compile_mlp.json`, with
    `lbfgs_implicit_unchecked`) took 0.80x the CPU time for one task and 0.80x for 16
    (medians of 3). A degenerate minimiser then gives a wrong
    hypergradient without an error.
    """

    linear_solver: lx.AbstractLinearSolver | None = None
    precondition: bool = True
    memory_preconditioner: bool = False
    all_pairs: bool | None = None
    damping: float = eqx.field(default=0.0, converter=python_number)
    check_degenerate: bool = True
    exact: ClassVar[bool] = True

    def __check_init__(self):
        # `bool("no")` is True: a flag that is not a boolean is refused, not coerced.
        for name in ("precondition", "memory_preconditioner", "check_degenerate", "all_pairs"):
            flag = getattr(self, name)
            if not (isinstance(flag, bool | np.bool_) or (name == "all_pairs" and flag is None)):
                allowed = "True, False or None" if name == "all_pairs" else "True or False"
                raise TypeError(f"ImplicitAdjoint needs `{name}` to be {allowed}, got {flag!r}.")
        # An infinite damping would make every hypergradient zero; NaN fails `>= 0`.
        if not (isinstance(self.damping, int | float) and 0 <= self.damping < float("inf")):
            raise ValueError(
                f"ImplicitAdjoint needs a finite damping >= 0 (a Python float), got "
                f"{self.damping!r}."
            )
        if self.linear_solver is not None and not isinstance(
            self.linear_solver, lx.AbstractLinearSolver
        ):
            raise TypeError(
                f"`linear_solver` must be a lineax solver such as lineax.CG(rtol=1e-10, "
                f"atol=1e-10), got {self.linear_solver!r}."
            )

    def solve(self, hessian, inverse_approx, v, newton_operator=None):
        """As `AbstractAdjoint.solve`; `newton_operator` is for the degenerate check.

        `newton_operator(i)`, for a traced int32 `i`, is `hessian` for `i = 0` and the
        Hessian at the Newton point for `i = 1` (see `_newton_point`); with it the stats
        have `hessian_change`, $\\|v - (H(x_k - \\delta) + \\lambda I) w\\|_2 / \\|v\\|_2$.
        [`lbfgs_implicit.CG`][] takes both products in its loop (its option
        `second_operator`), so the program traces the Hessian's linearisation and
        product once for the solve and the check.
        """
        hessian = _damped(self.damping, hessian)
        # The least precise leaf's: its products' rounding bounds the whole residual.
        dtype = coarsest_dtype(v)
        solver = self.linear_solver
        if solver is None:
            size = sum(leaf.size for leaf in jtu.tree_leaves(v))
            tol = default_tolerance(dtype)
            solver = CG(rtol=tol, max_steps=min(10 * size, 10_000))
        options = {}
        block = memory_of(inverse_approx)
        stats = {}
        if not (self.precondition and isinstance(solver, _ITERATIVE)):
            pass
        elif (
            self.all_pairs is None
            and not self.memory_preconditioner
            and (_cost(inverse_approx.mv, v) > MEMORY_COST * _cost(hessian.mv, v))
        ):
            # A product with the memory costs more than a tenth of a CG step: plain CG
            # from zero (see `ImplicitAdjoint`).
            pass
        elif self.memory_preconditioner or self.all_pairs is False or block is None:
            # `block is None`: bounds (the memory masked to the free set), where the
            # pairs are not curvature of the masked operator.
            options["y0"] = inverse_approx.mv(v)
            if self.memory_preconditioner:
                options["preconditioner"] = inverse_approx
        else:
            options, stats = _memory_policy(hessian, block, v, switch=isinstance(solver, lx.CG))
            if not isinstance(solver, CG):
                options.pop("r0")
                options.pop("precondition_if", None)
            if not isinstance(solver, (CG, lx.CG)):
                options.pop("preconditioner")
        for key in ("y0", "r0"):
            if key in options:
                # lineax does not differentiate `options`; the answer does not depend
                # on the initial guess, so no gradient is lost.
                options[key] = lax.stop_gradient(options[key])
        if isinstance(solver, CG):
            # The residual check's product taken inside CG's loop: one traced copy of
            # the Hessian-vector product instead of two.
            options["true_residual"] = True
            if newton_operator is not None and "y0" not in options:
                # From zero the loop's linearisation at x* is the program's only one at
                # run time; a start from the memory takes products before the loop, with
                # a linearisation of its own, so there the check keeps its product after
                # the loop (one linearisation at x* as before, instead of two).
                options["second_operator"] = jtu.Partial(_damped_at, self.damping, newton_operator)
        sol = _linear_solve(hessian, v, solver, options)
        w = sol.value
        vnorm = tree_norm2(v)
        if newton_operator is not None:
            if "second_residual" in sol.stats:
                change = sol.stats["second_residual"]
            else:
                shifted = _damped(self.damping, newton_operator(jnp.ones((), jnp.int32)))
                change = tree_norm2(tree_sub(v, shifted.mv(w)))
            stats["hessian_change"] = change / jnp.where(vnorm > 0, vnorm, 1)
        if "true_residual" in sol.stats:
            residual = sol.stats["true_residual"]
        else:
            residual = tree_norm2(tree_sub(hessian.mv(w), v))
        residual = residual / jnp.where(vnorm > 0, vnorm, 1)
        ok = tree_allfinite(w)
        if solver.assume_full_rank():
            ok = ok & (residual <= failure_tolerance(dtype))
        # A least-squares solver such as lineax.SVD (`assume_full_rank()` is False)
        # returns the least-norm answer on purpose; its residual is the part of `v`
        # outside the range of H.
        result = RESULTS.where(ok, RESULTS.successful, RESULTS.backward_failed)
        stats = {**stats, "num_steps": sol.stats.get("num_steps", jnp.zeros((), jnp.int32))}
        return w, result, {**stats, "residual": residual}


def _linear_solve(operator, vector, solver, options) -> lx.Solution:
    """`lineax.linear_solve(..., throw=False)`, except for [`CG`][], which is run directly.

    Running `CG` directly loses nothing: the solve runs inside `custom_linear_solve`
    (`solve_hessian`), which never differentiates it, and the callers judge the answer
    by its residual, not by lineax's `result`. It saves two traces of the CG loop
    (lineax's shape evaluation of its solve, and its lowering, which traces the solve
    again) and lineax's unused checks of the answer. On vectors split along an explicit
    mesh axis it is also the only way: lineax's shape evaluation drops its operands'
    shardings (lineax 0.1.1 makes them `ShapeDtypeStruct(shape, dtype)`), so the
    Hessian-vector product would be traced with an unsplit vector, which JAX refuses.
    """
    if isinstance(solver, CG):
        value, result, stats = solver.compute(solver.init(operator, options), vector, options)
        return lx.Solution(value=value, result=result, stats=stats, state=None)
    if any(explicit_sharding(leaf) is not None for leaf in jtu.tree_leaves(vector)):
        raise ValueError(
            f"The backward pass cannot use {type(solver).__name__} with parameters split "
            "along an explicit mesh axis: lineax's solves drop the shardings of their "
            "operands (lineax's shape evaluation), which JAX then refuses. Use the default "
            "`linear_solver=None` or `li.CG(rtol=...)`, or shard the parameters over "
            "`AxisType.Auto` axes."
        )
    return lx.linear_solve(operator, vector, solver, options=options, throw=False)


def _damped(damping: float, hessian: lx.AbstractLinearOperator) -> lx.AbstractLinearOperator:
    if damping > 0:
        hessian = hessian + damping * lx.IdentityLinearOperator(hessian.in_structure())
        hessian = lx.TaggedLinearOperator(hessian, (lx.symmetric_tag, lx.positive_semidefinite_tag))
    return hessian


def _damped_at(damping: float, operator_at: Callable, i) -> lx.AbstractLinearOperator:
    return _damped(damping, operator_at(i))


# `||r_0|| / ||v||` of the memory's start below which CG is preconditioned by the memory.
MEMORY_TEST = 0.5
# Estimated cost of a product with the memory, relative to a Hessian-vector product,
# above which the default backward does not use the memory: where it describes nothing,
# each preconditioned step then costs at most this much more than a plain one.
MEMORY_COST = 0.1


# Work (flops of a matrix product, elements of any other result) that costs about as
# much as launching one kernel on a CPU.
_KERNEL_WORK = 4096.0


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _sub_jaxprs(item)


def _jaxpr_cost(jaxpr) -> float:
    """Estimated cost of running `jaxpr` once, in kernel launches (see `_KERNEL_WORK`).

    One launch per operation plus its work: what decides between two ways of solving
    on small problems is how many kernels run, on large ones how much arithmetic.
    Loops count their body once.
    """
    cost = 0.0
    for eqn in jaxpr.eqns:
        inner = [j for value in eqn.params.values() for j in _sub_jaxprs(value)]
        if inner:
            cost += max(_jaxpr_cost(j) for j in inner)
            continue
        out = sum(math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars)
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = 2 * out * math.prod(lhs[i] for i in contract)
        cost += 1 + out / _KERNEL_WORK
    return cost


def _cost(fn, *args) -> float:
    return _jaxpr_cost(jax.make_jaxpr(fn)(*args).jaxpr)


def _switch_mv(use, block: BlockInverse, sigma, r):
    # For lineax's CG only, which `_linear_solve` refuses on vectors split along an
    # explicit mesh axis: under `vmap` this cond (turned into selects) would drop their
    # split, as the line search's would (see `StrongWolfe.__call__`).
    return lax.cond(use, lambda r: apply_block_inverse(block, sigma, r), lambda r: r, r)


def _block_mv(block: BlockInverse, sigma, r):
    return apply_block_inverse(block, sigma, r)


def _memory_policy(hessian: lx.AbstractLinearOperator, block: BlockInverse, v, switch: bool):
    """Start, preconditioner and stats of the all-pairs backward solve (see `ImplicitAdjoint`).

    The pairs give $P_\\sigma$ (`BlockInverse`) on their span: $P_\\sigma v = \\sigma u
    + S a$ with $u$ the part of $v$ the pairs do not describe. $\\sigma$ is fitted to the
    rest of the spectrum, the Rayleigh quotient $u^\\top u / u^\\top H u$; with $H S a$
    from one more product, the start $y_0 = P_\\sigma v$ comes with its exact
    residual $r_0 = v - \\sigma H u - H S a$, and CG needs no product to start. If
    $\\|r_0\\| \\le$ `MEMORY_TEST` $\\|v\\|$ the memory describes $H$ along $v$ and CG
    is preconditioned by $P_\\sigma$; otherwise a product with $P_\\sigma$ would cost
    more than it saves and CG runs unpreconditioned, from $y_0$ if it is better than
    zero, else from zero.

    Returns the lineax options and the stats. With `switch` (solvers other than
    [`lbfgs_implicit.CG`][], which cannot decide once before their loop) the
    preconditioner itself switches to the identity, at the price of a `lax.cond` per
    step.
    """
    a, c = block_split(block, v)
    h = block.history
    u = combine_pairs(h, v, -c, -a)
    sa = jtu.tree_map(
        lambda bs: jnp.tensordot(a.astype(bs.dtype), bs, axes=1, precision=EXACT), h.s
    )
    hu, hsa = hessian.mv(u), hessian.mv(sa)
    uu, uhu = tree_dot(u, u), tree_dot(u, hu)
    good = (uhu > 0) & jnp.isfinite(uhu) & (uu > 0)
    sigma = jnp.where(good, uu / jnp.where(good, uhu, 1), h.gamma).astype(a.dtype)
    y0 = tree_axpy(sigma, u, sa)
    r0 = tree_sub(tree_axpy(-sigma, hu, v), hsa)
    vnorm = tree_norm2(v)
    ratio = tree_norm2(r0) / jnp.where(vnorm > 0, vnorm, 1)
    ratio = jnp.where(jnp.isfinite(ratio) & (vnorm > 0), ratio, jnp.inf)
    use = ratio <= MEMORY_TEST
    start = ratio < 1
    y0 = jtu.tree_map(lambda y: jnp.where(start, y, jnp.zeros_like(y)), y0)
    r0 = jtu.tree_map(lambda r, vi: jnp.where(start, r, vi), r0, v)
    options = {"y0": y0, "r0": r0}
    structure = jax.eval_shape(lambda: v)
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    if switch:
        mv = jtu.Partial(_switch_mv, use, block, sigma)
    else:
        mv = jtu.Partial(_block_mv, block, sigma)
        options["precondition_if"] = use
    options["preconditioner"] = lx.FunctionLinearOperator(
        mv, structure, tags=tags, closure_convert=False
    )
    stats = {"memory_residual": ratio, "memory_preconditioned": use}
    return options, stats


class QuasiNewtonAdjoint(AbstractAdjoint):
    """Approximate implicit differentiation with the forward pass's L-BFGS inverse.

    Returns $w = H_k v$ with no Hessian-vector product at all (SHINE, Ramzi et al.,
    2022); `refine_steps = k > 0` runs `k` steps of CG preconditioned by $H_k$ and
    started from $H_k v$. Exact when $H_k$ equals $H^{-1}$, which even a quadratic
    explored within the memory does not ensure: $H_k$ keeps the secant equation of its
    newest pair only, and on a 4-parameter quadratic whose 11 steps all stay in a memory
    of 20 it was 0.56% off (`test_quasi_newton_is_not_exact_on_a_quadratic_within_its_memory`
    in `tests/test_adjoint.py`). Otherwise the error depends on
    how well the history captured the Hessian in the direction of `v`, and a tighter
    forward tolerance does not reduce it. Measured (docs, "Measured accuracy and cost",
    `benchmarks/results/adjoint_table.json`): 18% to 62% off on ridge, logistic and
    digits regressions, and on an iMAML MLP with 1761 parameters 660% off with a cosine
    of 0.10 to the true hypergradient, nearly orthogonal to it. Compare with
    `ImplicitAdjoint()` on your problem before relying on it.

    ??? cite "References"

        ```bibtex
        @inproceedings{ramzi2022shine,
            title={{SHINE}: {SH}aring the {IN}verse {E}stimate from the forward pass
                   for bi-level optimization and implicit models},
            author={Ramzi, Zaccharie and Mannel, Florian and Bai, Shaojie and
                    Starck, Jean-Luc and Ciuciu, Philippe and Moreau, Thomas},
            booktitle={International Conference on Learning Representations},
            year={2022}
        }
        ```
    """

    refine_steps: int = eqx.field(default=0, converter=python_number)
    exact: ClassVar[bool] = False

    def __check_init__(self):
        # `bool` is a subclass of `int`: `refine_steps=True` is a mistake, not a 1.
        if (
            not isinstance(self.refine_steps, int)
            or isinstance(self.refine_steps, bool)
            or self.refine_steps < 0
        ):
            raise ValueError(
                f"QuasiNewtonAdjoint needs an integer refine_steps >= 0, got {self.refine_steps!r}."
            )

    def solve(self, hessian, inverse_approx, v):
        w0 = inverse_approx.mv(v)
        if self.refine_steps == 0:
            w, num_steps = w0, jnp.zeros((), jnp.int32)
        else:
            solver = CG(rtol=0.0, max_steps=self.refine_steps)
            options = {"preconditioner": inverse_approx, "y0": lax.stop_gradient(w0)}
            sol = _linear_solve(hessian, v, solver, options)
            w, num_steps = sol.value, sol.stats["num_steps"]
        # Approximate by design: only a non-finite answer is a failure.
        result = RESULTS.where(tree_allfinite(w), RESULTS.successful, RESULTS.backward_failed)
        return w, result, {"num_steps": num_steps}


def degenerate_tolerance(dtype) -> float:
    """Relative Hessian change (see `_hessian_change`) above which the backward fails.

    `0.1` (at least `10 eps^(2/3)` of the dtype, `0.39` in bfloat16, where the products
    themselves carry a few percent of rounding): the first-order error of the
    hypergradient is about this fraction, so a larger value means the forward solve
    stopped where the implicit function theorem's linearisation does not hold yet.
    """
    return max(0.1, 10 * eps(dtype) ** (2 / 3))


def _newton_point(x_star, g_star, inverse_approx, free):
    """Where to measure how much the Hessian, applied to `w`, changes up to the minimiser.

    The implicit function theorem is applied at the returned point $x_k$ as if it were
    the minimiser $x^*$; the answer $w = H(x_k)^{-1} v$ is off by about
    $H^{-1}(H(x^*) - H(x_k))\\,w$. The distance to $x^*$ is estimated by the Newton step
    $\\delta = H_k \\nabla f(x_k)$ with the forward pass's memory (no extra solve), and
    $\\|(H(x_k - \\delta) - H(x_k))\\,w\\|_2 / \\|H(x_k)\\,w\\|_2$ is the test: one more
    Hessian-vector product (`_hessian_change_of`, or CG's, see `ImplicitAdjoint.solve`).
    At a nondegenerate minimum it is of the order of the
    gradient norm (the Hessian hardly changes over a step that small); at a degenerate
    one, such as that of $x^4$, the Hessian vanishes at the minimiser and the returned
    point is never close enough: the Newton step is a fixed fraction of the distance,
    the Hessian changes by tens of percent over it, and the hypergradient is wrong by
    as much, whatever `gtol`.

    With bounds (`free` not None) the same holds on the free coordinates, where the
    implicit function theorem is applied: the step and the change are taken there, and
    active coordinates stay on their bounds.

    Returns the Newton point $x_k - \\delta$ (`delta` stop-gradiented), where
    `_hvp_between` or `_linearised` linearise the gradient.
    """
    if free is None:
        delta = inverse_approx.mv(g_star)
    else:
        delta = _keep(free, inverse_approx.mv(_keep(free, g_star)))
    return tree_sub(x_star, lax.stop_gradient(delta))


def _linearised(theta, x: PyTree[Array]) -> jtu.Partial:
    """The Hessian-vector product at `x` (reverse-over-reverse, linearised once)."""
    _, vjp_grad = jax.vjp(lambda y: _grad_x(y, theta), x)
    return jtu.Partial(_first_output, vjp_grad)


def _in_mesh() -> bool:
    """Whether tracing under a mesh (`jax.set_mesh`, `jax.shard_map`).

    With explicit or manual axes lineax's shape evaluation calls the solver with
    unsharded stand-ins for its operands, and `fn`'s closure conversion rejects them:
    `_hvp_between`, which calls `fn` inside the solve, is then not used (the check
    linearises before the solve, as other adjoints' do).
    """
    try:
        return len(jax.sharding.get_abstract_mesh().axis_types) > 0
    except AttributeError:
        return False


def _hvp_between(theta, x_star, x_newton, i) -> jtu.Partial:
    """`_linearised` at `x_star` for `i = 0`, at `x_newton` for `i = 1` (`i` traced).

    One traced linearisation for both points: CG calls it in the loop around its steps
    (see `ImplicitAdjoint.solve`), so the program holds one copy of the gradient's
    linearisation and of its product instead of two.
    """
    return _linearised(theta, tree_where(i == 0, x_star, x_newton))


def _hessian_change_of(hvp_shifted, hvp, damping, free, w, v):
    if hvp is None:
        # v stands for (H(x_k) + damping I) w: for a solver that assumes full rank they
        # differ by the solve's residual, at most sqrt(eps) of v when the answer is
        # accepted (it is rejected anyway otherwise), far below `degenerate_tolerance`.
        # This saves a Hessian-vector product.
        diff = tree_sub(tree_axpy(damping, w, hvp_shifted(w)), v)
    else:
        diff = tree_sub(hvp_shifted(w), hvp(w))
    if free is not None:
        diff = _keep(free, diff)
    norm = tree_norm2(v)
    return tree_norm2(diff) / jnp.where(norm > 0, norm, 1)


def _uses_block(adjoint: AbstractAdjoint) -> bool:
    return (
        isinstance(adjoint, ImplicitAdjoint)
        and adjoint.precondition
        and adjoint.all_pairs is not False
        and not adjoint.memory_preconditioner
        and isinstance(adjoint.linear_solver, (type(None),) + _ITERATIVE)
    )


def _objective(x: PyTree[Array], theta) -> tuple[Array, Any]:
    """`fn(x, args)` for `theta = (closed_fn, args, box)`: the one place that unpacks it."""
    closed_fn, args = theta[:2]
    return closed_fn(x, args)


def _grad_x(x: PyTree[Array], theta) -> PyTree[Array]:
    return jax.grad(lambda y: _objective(y, theta)[0])(x)


def _first_output(vjp, u):
    return vjp(u)[0]


def _keep(mask: PyTree[Array], u: PyTree[Array], other=None) -> PyTree[Array]:
    """`u` where `mask`, else `other` (zero by default): $P_F u + P_A\\,\\mathrm{other}$."""
    if other is None:
        return jtu.tree_map(lambda ui, mi: jnp.where(mi, ui, 0), u, mask)
    return jtu.tree_map(lambda ui, oi, mi: jnp.where(mi, ui, oi), u, other, mask)


def _masked_mv(operator: lx.AbstractLinearOperator, free: PyTree[Array], u):
    return _keep(free, operator.mv(_keep(free, u)), u)


def _operator_at(hvp_at: jtu.Partial, structure, free, i) -> lx.AbstractLinearOperator:
    """The Hessian operator of `solve_hessian` from the product `hvp_at(i)`."""
    operator = lx.FunctionLinearOperator(
        hvp_at(i),
        structure,
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        closure_convert=False,
    )
    return operator if free is None else _masked(operator, free)


def _masked(operator: lx.AbstractLinearOperator, free: PyTree[Array]):
    """$P_F A P_F + P_A$ for the free-set mask `free` (identity on the active set)."""
    return lx.FunctionLinearOperator(
        jtu.Partial(_masked_mv, operator, free),
        operator.in_structure(),
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        closure_convert=False,
    )


def solve_hessian(
    hvp: jtu.Partial,
    b: PyTree[Array],
    inverse_approx: lx.AbstractLinearOperator,
    adjoint: AbstractAdjoint,
    throw: bool,
    verbose: bool,
    free: PyTree[Array] | None = None,
    check: Callable | None = None,
    newton_hvp: jtu.Partial | None = None,
) -> PyTree[Array]:
    """$w = H^{-1} b$ at the solution: the one linear solve of every derivative.

    `inverse_approx` is the forward pass's L-BFGS inverse Hessian $H_k$ (stop-gradiented).

    Forward mode calls it on the tangent's right-hand side; reverse mode runs its
    transpose, which (H being symmetric) is the same solve on the cotangent. It is a
    `jax.lax.custom_linear_solve`, so JAX sees a linear map of `b` that it transposes
    and differentiates (with respect to the operator too, for higher derivatives)
    without differentiating the solver: the start $H_k b$, the preconditioner if any,
    the right-hand-side scaling and the checks below belong to the solve and so are
    kept in both directions.

    With bounds, `free` masks the free coordinates and the operator is
    $P_F H P_F + P_A$ (its memory $P_F H_k P_F + P_A$): on the free set this
    solves $H_{FF} w_F = b_F$, on the active set it returns $b_A$. The
    degenerate-minimiser test (`_newton_point`), for exact adjoints, is either
    `check(w, b)`, the relative change, or `newton_hvp(i)`, the Hessian-vector product
    at the solution (`i = 0`) or the Newton point (`i = 1`), which `ImplicitAdjoint`
    applies in CG's loop.
    """
    structure = jax.eval_shape(lambda: b)
    # A pytree function whose leaves are the linearisation's residuals, so lineax can
    # carry it without closure conversion. Closure conversion would compare every call
    # with `structure` including shardings, and under an explicit-axes mesh lineax's
    # own shape evaluation calls `mv` with unsharded stand-ins, which fails.
    hessian = lx.FunctionLinearOperator(
        hvp,
        structure,
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        closure_convert=False,
    )
    if free is not None:
        hessian = _masked(hessian, free)
        inverse_approx = _masked(inverse_approx, free)
    newton_operator = None
    if newton_hvp is not None:
        newton_operator = jtu.Partial(_operator_at, newton_hvp, structure, free)
    # What the solve closes over (the operator it iterates with, the start, the
    # preconditioner, the checks) does not change the answer, only how it is found:
    # the answer's derivative comes from `hessian.mv` and `b` alone (custom_linear_solve's
    # rule). Cut off here, these carry no tangents when the solve is differentiated
    # again (jax.hessian, jacfwd of jacfwd). Otherwise, where neither the Hessian nor
    # `b` depends on the new perturbation (a hyperparameter entering the objective
    # linearly in x, as least-squares targets do), JAX's rule would still run for the
    # solve's own tangents and fail on `b`'s symbolic zero (jax 0.10 to 0.12).
    solve_operands = _without_tangents((hessian, inverse_approx, newton_operator, check))

    def make_solve(direction: str):
        def solve(matvec, rhs):
            # `matvec` is `hessian.mv` as a closure over custom_linear_solve's tracers,
            # which lineax could only carry by closure conversion (see above); the
            # operator itself is the same linear map.
            del matvec
            return _scaled_solve(
                adjoint,
                *solve_operands,
                rhs,
                throw=throw,
                direction=direction if verbose else None,
            )

        return solve

    return lax.custom_linear_solve(
        hessian.mv, b, make_solve("tangent"), make_solve("backward"), symmetric=True
    )


def _without_tangents(tree: PyTree) -> PyTree:
    """`tree` with `lax.stop_gradient` on its arrays (other leaves as they are)."""
    dyn, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(lax.stop_gradient(dyn), static)


# `custom_linear_solve` traces the tangent solve and its transpose (the backward one),
# which for a symmetric Hessian are the same solve. As one jitted function called with the
# same operands, the second is served from jit's trace cache, and so is its batching under
# `jax.vmap`: one trace of the linear solve per program instead of two or more. XLA
# inlines the call, so the compiled program is the same.
@eqx.filter_jit
def _scaled_solve(
    adjoint, hessian, inverse_approx, newton_operator, check, rhs, *, throw, direction
):
    """`adjoint`'s solve of `hessian w = rhs`, with the checks of `solve_hessian`.

    `direction` is `None` without `verbose`, else the name the printout gives the solve.
    """
    # A non-finite (co)tangent comes from outside the solve (an outer loss whose own
    # derivative is NaN): the answer is NaN, as autodiff gives it anywhere else, and not
    # a failure of the solve, whose message would blame the Hessian.
    finite = tree_allfinite(rhs)
    # Scale the right-hand side to unit infinity norm so absolute tolerances
    # mean the same thing whatever the size of the (co)tangent.
    scale = tree_norm_inf(rhs)
    safe = jnp.where(scale > 0, scale, 1)
    rhs = tree_scale(1 / safe, rhs)
    if newton_operator is None:
        w, result, stats = adjoint.solve(hessian, inverse_approx, rhs)
    else:
        w, result, stats = adjoint.solve(hessian, inverse_approx, rhs, newton_operator)
    if check is not None:
        stats = {**stats, "hessian_change": check(w, rhs)}
    if "hessian_change" in stats:
        change = stats["hessian_change"]
        ok = ~(change > degenerate_tolerance(coarsest_dtype(w)))
        result = RESULTS.where(ok, result, RESULTS.backward_failed)
    w = tree_scale(safe, w)
    failed = (result != RESULTS.successful) & finite
    if direction is not None:
        jax.debug.print(
            f"implicit {direction}: "
            "{n} linear-solve steps, relative residual {r:.3e}, "
            "Hessian change to the Newton point {c:.3e}",
            n=stats["num_steps"],
            r=stats.get("residual", jnp.nan),
            c=stats.get("hessian_change", jnp.nan),
            ordered=True,
        )
    if throw:
        # A scalar through the error check, as in `optimize`: passing `w` itself
        # would gather a sharded `w` onto one device.
        failed = raise_in_program(failed, result._value, "backward")
    return jtu.tree_map(lambda leaf: jnp.where(failed | ~finite, jnp.nan, leaf), w)


def _is_none(x) -> bool:
    return x is None


def _active_tangent(t, at_lower, at_upper, x_star):
    """The tangent of the bound each active coordinate sits on (zero elsewhere)."""
    t_lower, t_upper = (None, None) if t is None else (t.lower, t.upper)

    def full(tb):
        if tb is None:
            return jtu.tree_map(jnp.zeros_like, x_star)
        return jtu.tree_map(
            lambda ti, xi: jnp.zeros_like(xi) if ti is None else ti, tb, x_star, is_leaf=_is_none
        )

    zero = jtu.tree_map(jnp.zeros_like, x_star)
    return _keep(at_lower, full(t_lower), _keep(at_upper, full(t_upper), zero))


def implicit_solve(theta, *, x0, solver, adjoint, throw, warm_start=None):
    """`(x*, f(x*), state)` of the solve, differentiable in `theta = (closed_fn, args, box)`.

    `box` is a normalised `Box` or `None`. Only `theta` is differentiated; every keyword
    is configuration or data with a zero derivative (`x0` and `warm_start`, a `History`
    or `None` that seeds the solver's memory: the minimiser does not depend on where the
    solve started or with which memory). `f(x*)` is the loop's own value at `x*`, in
    the solver state's dtype.
    """
    return _implicit_solve(
        theta,
        x0=x0,
        solver=solver,
        adjoint=adjoint,
        throw=throw,
        warm_start=warm_start,
        traces=_Traces(),
    )


class _Traces:
    """The jaxprs of one `implicit_solve`'s forward solve (`replay`), shared by its
    primal and its JVP rule's: a plain object, so that it reaches both by reference."""

    def __init__(self):
        self.jaxprs = {}


@eqx.filter_custom_jvp
def _implicit_solve(theta, *, x0, solver, adjoint, throw, warm_start, traces):
    # Under `jax.jit` of `jax.grad` the forward solve is traced twice: as the primal of
    # the jitted program, then as the primal of the JVP rule, when the program is
    # linearised. The second evaluates the first's jaxpr (and the forward's `vmap`
    # rule, `_batching.nested_vmap`, its batched jaxpr).
    del adjoint, throw
    dyn, static = eqx.partition((theta, x0, warm_start), eqx.is_array)

    def solve(dyn):
        (fn, args, box), x0, warm_start = eqx.combine(dyn, static)
        x_star, state = iterate(solver, fn, args, x0, box, warm_start)
        return x_star, state.f, state

    return replay(traces.jaxprs, "forward", solve, dyn)


@_implicit_solve.def_jvp
def _implicit_solve_jvp(primals, tangents, *, x0, solver, adjoint, throw, warm_start, traces):
    (theta,) = primals
    (t_theta,) = tangents
    # The primal through the custom-JVP function itself (not `iterate`), so that
    # differentiating this rule again (jax.hessian, reverse-over-reverse) sees the
    # implicit derivative of x* instead of an unrolled while loop.
    out = _implicit_solve(
        theta,
        x0=x0,
        solver=solver,
        adjoint=adjoint,
        throw=throw,
        warm_start=warm_start,
        traces=traces,
    )
    x_star, value, state = out
    state = lax.stop_gradient(state)
    if throw:
        check_can_raise((theta, x_star, t_theta), "backward pass")
    box = theta[2]
    t_box = None if t_theta is None else t_theta[2]
    t_fa = (None, None) if t_theta is None else t_theta[:2]

    # Only the perturbed leaves of (closed_fn, args) are differentiated.
    perturbed = jtu.tree_map(lambda t: t is not None, t_fa, is_leaf=_is_none)
    diff, nondiff = eqx.partition(theta[:2], perturbed)
    t_diff = eqx.filter(t_fa, perturbed, is_leaf=_is_none)
    has_t_diff = len(jtu.tree_leaves(t_diff)) > 0

    # Hessian-vector products by reverse-over-reverse, linearised once at x*. H is
    # symmetric, so the VJP of the gradient is the HVP. Measured as fast as
    # forward-over-reverse (jax.linearize), and unlike it this works when `fn` calls a
    # custom-VJP function, such as another `optimize`.
    g_x, vjp_grad = jax.vjp(lambda x: _grad_x(x, theta), x_star)
    hvp = jtu.Partial(_first_output, vjp_grad)

    # Tangent equation: H x_dot = -(d/dtheta grad_x f) theta_dot. The right-hand side is
    # grad_x <grad_theta f, theta_dot> (reverse-over-reverse), so that, like the
    # Hessian-vector products, it goes through custom-VJP functions in `fn`.
    if has_t_diff:

        def grad_theta(x):
            return jax.grad(lambda d: _objective(x, eqx.combine(d, nondiff))[0])(diff)

        g_theta, vjp_x = jax.vjp(grad_theta, x_star)
        (rhs,) = vjp_x(t_diff)
    else:
        rhs = jtu.tree_map(jnp.zeros_like, x_star)

    # The memory's all-pairs inverse depends on the forward solve only: built here, once
    # per linearisation, for the default backward (unbounded; see ImplicitAdjoint).
    block = None
    if box is None and _uses_block(adjoint):
        block = block_inverse(lax.stop_gradient(state.history))
    inverse_approx = inverse_hessian_operator(state.history, jax.eval_shape(lambda: x_star), block)
    if box is None:
        free = None
    else:
        # On the active set x* equals the bound, so its tangent is the bound's; the free
        # coordinates solve H_FF x_dot_F = -(d/dtheta grad_F f) theta_dot - H_FA x_dot_A.
        # Transposed, the cotangent flows to the bound through (v - H w)_A.
        at_lower, at_upper = active_masks(x_star, state.g, box)
        free = jtu.tree_map(lambda a, b: ~(a | b), at_lower, at_upper)
        t_bound = None
        if t_box is not None and any(
            leaf is not None for leaf in jtu.tree_leaves(t_box, is_leaf=_is_none)
        ):
            t_bound = _active_tangent(t_box, at_lower, at_upper, x_star)
            rhs = jtu.tree_map(jnp.add, rhs, hvp(t_bound))
        rhs = _keep(free, rhs)
    # Reverse mode transposes the solve, and JAX's transpose of custom_linear_solve needs
    # every leaf of its right-hand side to be linear in the tangents; a leaf that theta
    # does not reach (zero whatever the tangent) would be a constant. Adding a zero that
    # is linear in the tangents keeps each leaf in the linear part.
    t_leaves = jtu.tree_leaves((t_diff, t_box))
    if t_leaves:
        zero = sum(jnp.sum(leaf * 0).astype(jnp.float32) for leaf in t_leaves)
        rhs = jtu.tree_map(lambda r: r + zero.astype(r.dtype), rhs)
    check = newton_hvp = None
    if adjoint.exact and (not isinstance(adjoint, ImplicitAdjoint) or adjoint.check_degenerate):
        if (
            isinstance(adjoint, ImplicitAdjoint)
            and isinstance(adjoint.linear_solver, type(None) | CG)
            and not _in_mesh()
        ):
            if free is None:
                # The solver's own gradient: the linearisation before the solve is then
                # dead code. With bounds `g_x` stays the differentiable one: it is not
                # zero on the active set, and `t_value`'s <g_x, t_x> needs its
                # derivative in second-order modes (`state` is stop-gradiented).
                g_x = state.g
            x_newton = _newton_point(x_star, state.g, inverse_approx, free)
            newton_hvp = jtu.Partial(_hvp_between, theta, x_star, x_newton)
        else:
            x_newton = _newton_point(x_star, g_x, inverse_approx, free)
            hvp_shifted = _linearised(theta, x_newton)
            full_rank = isinstance(adjoint, ImplicitAdjoint) and (
                adjoint.linear_solver is None or adjoint.linear_solver.assume_full_rank()
            )
            if full_rank and free is None:
                check = jtu.Partial(_hessian_change_of, hvp_shifted, None, adjoint.damping, None)
            else:
                # A least-squares answer leaves the part of v outside H's range, and with
                # bounds v is the masked operator's: the product itself is compared.
                check = jtu.Partial(_hessian_change_of, hvp_shifted, hvp, 0.0, free)
    w = solve_hessian(
        hvp, rhs, inverse_approx, adjoint, throw, solver.verbose, free, check, newton_hvp
    )
    t_x = tree_neg(w)
    if free is not None:
        # Masking after the solve too: transposed, this masks the cotangent before it,
        # so reverse mode solves (P_F H P_F + P_A) w = P_F v with nothing on A.
        t_x = _keep(free, t_x, t_bound)

    # d f(x*(theta), theta) = <grad_x f, x_dot> + <grad_theta f, theta_dot>, from the
    # gradients already computed; the first term is ~0 at an unconstrained minimiser
    # but kept, so the derivative is that of the value actually returned.
    # Each term in the value's dtype: the parameters' and theta's can differ (float32
    # data, a float64 leaf), which a user's strict dtype promotion would refuse to add.
    t_value = tree_dot(g_x, t_x).astype(value.dtype)
    if has_t_diff:
        t_value = t_value + tree_dot(g_theta, t_diff).astype(value.dtype)
    t_state = jtu.tree_map(lambda _: None, state)
    return out, (t_x, t_value, t_state)
