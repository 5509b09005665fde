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
4. Under `jax.vmap` (with `true_residual`, as the adjoint solves), large batches run in
   refilled lanes, each system paying its own steps instead of the slowest one's
   (`_plain_loop`; the lanes are the forward solve's, `_batching.run_lanes`).
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.extend
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx

from . import _batching
from ._misc import (
    python_number,
    tree_axpy,
    tree_dot,
    tree_norm2,
    tree_sub,
    tree_where,
    zeros_rows,
)


class CG(lx.AbstractLinearSolver):
    """Preconditioned conjugate gradients for symmetric positive definite operators.

    Used by [`lbfgs_implicit.ImplicitAdjoint`][] by default; accepts the lineax options
    `preconditioner` (a positive definite operator), `y0` (initial guess), `r0` (its
    residual `b - A y0`, when the caller has it; saves a product), `precondition_if`
    (a boolean scalar: where false, the steps are unpreconditioned; decided once, so a
    solve that does not use the preconditioner pays nothing for it per step) and
    `true_residual` (a Python bool: also return $\\|b - Ay\\|_2$ of the answer as the
    stat `true_residual`, from one more product taken by the loop itself, so that a
    program holds one copy of the operator's product instead of two) and
    `second_operator` (with `true_residual`: a function of a traced int32 `i`
    returning a linear operator, `A` itself for `i = 0` and a second operator `B` of
    the same structure for `i = 1`; the stat `second_residual` is then
    $\\|b - By\\|_2$ of the answer. The loop builds its operator by calling it, once for
    its steps and once more for the product with `B`, so a program that makes its
    operators by linearising a function at a point traces that linearisation and its
    product once for both).

    **Arguments:**

    - `rtol`, `atol`: stop when $\\|b - Ay\\|_2 \\le$ `atol` + `rtol` $\\|b\\|_2$.
    - `max_steps`: iteration limit; `None` means `10 n`. Reaching it gives
      `lineax.RESULTS.max_steps_reached`.
    """

    rtol: float = eqx.field(converter=python_number)
    atol: float = eqx.field(default=0.0, converter=python_number)
    max_steps: int | None = eqx.field(default=None, converter=python_number)

    def __check_init__(self):
        # Python numbers only: an array would be a traced leaf of the solver under
        # `jit`, where the tolerances are read in Python.
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(
                    f"CG needs {name} to be a Python float, got {type(value).__name__} "
                    f"{value!r}; pass e.g. `{name}=1e-8`."
                )
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
        ):
            raise TypeError(f"CG needs max_steps to be an int or None, got {self.max_steps!r}.")
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"CG needs rtol, atol >= 0, got {self.rtol!r}, {self.atol!r}.")
        if self.rtol == float("inf") or self.atol == float("inf"):
            raise ValueError(
                f"CG needs finite rtol and atol, got {self.rtol!r}, {self.atol!r}: every "
                "answer would meet an infinite tolerance, so it would stop without a step."
            )
        if self.rtol == 0 and self.atol == 0 and self.max_steps is None:
            raise ValueError("CG needs a tolerance (rtol or atol > 0) or max_steps.")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"CG needs max_steps >= 0, got {self.max_steps!r}.")

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        return lx.linearise(operator)

    def compute(self, state, vector, options):
        operator = state
        size = sum(leaf.size for leaf in jtu.tree_leaves(vector))
        max_steps = 10 * size if self.max_steps is None else self.max_steps
        target = self.atol + self.rtol * tree_norm2(vector)

        if "r0" in options:
            y, r = options["y0"], options["r0"]
        elif "y0" in options:
            y = options["y0"]
            r = tree_sub(vector, operator.mv(y))
        else:
            # From zero the residual is the right-hand side: no product.
            y = jtu.tree_map(jnp.zeros_like, vector)
            r = vector
        k = jnp.zeros((), jnp.int32)
        preconditioner = options.get("preconditioner")
        use = options.get("precondition_if", True)
        want_residual = options.get("true_residual", False)
        second = options.get("second_operator") if want_residual else None
        broke = jnp.array(False)
        true_norm = second_norm = None
        if preconditioner is not None:
            y, r, k, broke, rr, _ = _cg_loop(
                operator, preconditioner.mv, y, r, k, target, max_steps, use
            )
        if preconditioner is None or "precondition_if" in options:
            # Unpreconditioned where the preconditioner was not to be used, and where it
            # broke down (not positive definite on the Krylov space): plain CG continues
            # from its iterate.
            enabled = ~jnp.asarray(use) | broke if preconditioner is not None else True
            b = vector if want_residual else None
            # From zero, `y` and `k` are the same for every right-hand side.
            from_zero = preconditioner is None and "y0" not in options
            y, r, k, broke, rr, second_norm = _plain_loop(
                operator, y, r, k, target, max_steps, enabled, b, second, from_zero
            )
            true_norm = r if want_residual else None
        stats = {"num_steps": k}
        if want_residual:
            if true_norm is None:
                # The last loop was preconditioned: its turns apply the preconditioner,
                # which a residual turn would not need.
                true_norm = tree_norm2(tree_sub(vector, operator.mv(y)))
            stats["true_residual"] = true_norm
        if second is not None:
            if second_norm is None:
                second_op = second(jnp.ones((), jnp.int32))
                second_norm = tree_norm2(tree_sub(vector, second_op.mv(y)))
            stats["second_residual"] = second_norm
        # `rr` is the steps' own (recursive) residual's, which they stop on.
        converged = jnp.sqrt(rr) <= target
        result = lx.RESULTS.where(
            broke,
            lx.RESULTS.breakdown,
            lx.RESULTS.where(converged, lx.RESULTS.successful, lx.RESULTS.max_steps_reached),
        )
        if self.max_steps is not None and self.rtol == 0 and self.atol == 0:
            # A fixed number of steps was asked for (a refinement), not convergence.
            result = lx.RESULTS.where(broke, lx.RESULTS.breakdown, lx.RESULTS.successful)
        return y, result, stats

    def transpose(self, state, options):
        transposed = {}
        if "preconditioner" in options:
            transposed["preconditioner"] = options["preconditioner"].transpose()
        for key in ("precondition_if", "true_residual"):
            if key in options:
                transposed[key] = options[key]
        if "second_operator" in options:
            transposed["second_operator"] = _Transposed(options["second_operator"])
        return state.transpose(), transposed

    def conj(self, state, options):
        conjugated = {}
        if "preconditioner" in options:
            conjugated["preconditioner"] = lx.conj(options["preconditioner"])
        for key in ("precondition_if", "true_residual"):
            if key in options:
                conjugated[key] = options[key]
        if "second_operator" in options:
            conjugated["second_operator"] = _Conjugated(options["second_operator"])
        return lx.conj(state), conjugated

    def assume_full_rank(self):
        return True


class _Transposed(eqx.Module):
    at: Callable

    def __call__(self, i):
        return self.at(i).transpose()


class _Conjugated(eqx.Module):
    at: Callable

    def __call__(self, i):
        return lx.conj(self.at(i))


def _direction(precondition, carry):
    """The next search direction of the CG carry `(y, r, p, gamma, rr, k, broke)`, and
    its `r'z` (`precondition` None: plain)."""
    y, r, p, gamma, rr, k, _ = carry
    if precondition is None:
        z, gamma_new = r, rr
    else:
        z = precondition(r)
        gamma_new = tree_dot(r, z)
    return tree_axpy(gamma_new / gamma, p, z), gamma_new


def _initial(y, r, k):
    """The CG carry `(y, r, p, gamma, rr, k, broke)` before the first step from `(y, r)`."""
    rr = tree_dot(r, r)
    zero = jtu.tree_map(jnp.zeros_like, y)
    # With p = 0 the first step's beta multiplies nothing; gamma = 1 keeps it finite.
    return (y, r, zero, jnp.ones((), rr.dtype), rr, k, jnp.array(False))


def _stepping(carry, enabled, target, max_steps):
    """Whether the CG carry takes another step."""
    *_, rr, k, broke = carry
    return enabled & (jnp.sqrt(rr) > target) & (k < max_steps) & ~broke


def _advance(carry, p, gamma_new, ap):
    """The CG carry after the step along `p`, whose product is `ap`."""
    y, r, _, _, _, k, _ = carry
    pap = tree_dot(p, ap)
    # Not positive definite on the Krylov space (operator or preconditioner).
    broke = ~(pap > 0) | ~jnp.isfinite(pap) | ~(gamma_new > 0)
    alpha = jnp.where(broke, 0, gamma_new / jnp.where(broke, 1, pap))
    y = tree_axpy(alpha, p, y)
    r = tree_axpy(-alpha, ap, r)
    gamma = jnp.where(broke, jnp.ones_like(gamma_new), gamma_new)
    return y, r, p, gamma, tree_dot(r, r), k + 1, broke


def _step_or_residual(operator, carry, go, b):
    """One turn of plain CG with a residual turn: the step along the next direction
    where `go`, else the true residual $b - Ay$ written into `r`. One product either
    way ($Ap$ or $Ay$), so the operator is traced once for both."""
    y, _, _, _, rr, k, broke = carry
    p, gamma_new = _direction(None, carry)
    au = operator.mv(tree_where(go, p, y))
    stepped = _advance(carry, p, gamma_new, au)
    return (
        tree_where(go, stepped[0], y),
        tree_where(go, stepped[1], tree_sub(b, au)),
        *stepped[2:4],
        jnp.where(go, stepped[4], rr),
        k + go.astype(k.dtype),
        broke | (go & stepped[6]),
    )


def _cg_loop(operator, precondition, y, r, k, target, max_steps, enabled, b=None, second=None):
    """CG steps from `(y, r)` while `enabled` and unconverged; `precondition` None is plain.

    Returns `(y, r, k, broke, rr, second)` with `rr` the squared norm of the steps'
    residual. The preconditioner is applied at the top of a step, so a loop that does
    not run (or stops converged) applies it no more often than it takes steps. `rr =
    r'r` is carried for the stopping test, which for plain CG is also `r'z`.

    With `b` (plain CG only) the loop takes one more turn once the steps are over, whose
    product is $Ay$ instead of $Ap$, and returns the true residual's norm
    $\\|b - Ay\\|_2$ as `r` (and still the steps' `rr`): the product of a check after the
    loop, with the operator traced once. With `second` as well (see `CG`'s option
    `second_operator`) an outer loop of two turns builds the operator as `second(i)`:
    the steps and the residual turn with `second(0)`, then one turn with `second(1)`,
    whose residual's norm is returned as `second`. The operator (a linearisation, say)
    is built once per outer turn, so the steps pay nothing for the choice. Otherwise
    `second` is None.
    """
    init = _initial(y, r, k)

    def stepping(carry, enabled):
        return _stepping(carry, enabled, target, max_steps)

    if b is None:

        def body(carry):
            p, gamma_new = _direction(precondition, carry)
            return _advance(carry, p, gamma_new, operator.mv(p))

        y, r, _, _, rr, k, broke = lax.while_loop(
            lambda carry: stepping(carry, enabled), body, init
        )
        return y, r, k, broke, rr, None

    def body_with_residual(operator, enabled, loop):
        carry, _ = loop
        go = stepping(carry, enabled)
        # The residual turn ends the loop, so only what the loop returns is kept
        # through it.
        return _step_or_residual(operator, carry, go, b), ~go

    def run(operator, enabled, carry):
        body = ft.partial(body_with_residual, operator, enabled)
        carry, _ = lax.while_loop(lambda loop: ~loop[1], body, (carry, jnp.array(False)))
        return carry

    if second is None:
        y, r, _, _, rr, k, broke = run(operator, enabled, init)
        return y, tree_norm2(r), k, broke, rr, None

    def outer(state):
        i, carry, true_norm = state
        # The second turn takes no step: its one product is B y.
        carry = run(second(i), enabled & (i == 0), carry)
        true_norm = jnp.where(i == 0, tree_norm2(carry[1]), true_norm)
        return i + 1, carry, true_norm

    i0 = jnp.zeros((), jnp.int32)
    state = (i0, init, jnp.zeros((), init[4].dtype))
    _, carry, true_norm = lax.while_loop(lambda state: state[0] < 2, outer, state)
    y, second_r, _, _, rr, k, broke = carry
    return y, true_norm, k, broke, rr, tree_norm2(second_r)


def _plain_loop(operator, y, r, k, target, max_steps, enabled, b, second, from_zero=False):
    """`_cg_loop` unpreconditioned; under `jax.vmap` with a residual turn (`b`), the
    batch runs in refilled lanes (`_lanes`) where `_batching.backward_lanes` says so.

    Plain `vmap` of the loop runs every element's steps until the slowest element has
    converged; in lanes each element pays its own steps, residual turn and second
    product. The operands are passed explicitly (a `custom_vmap` cannot close over
    batched values). Nested `vmap`s run as one batch (`_batching.nested_vmap`): under
    `jax.vmap` of `jax.jacfwd` or `jax.hessian` the tangents' basis alone is too small
    for lanes, the basis times the batch's elements is not.

    The loop's state from the right-hand side (`r`, `target`, `enabled`, `b`, and `y`
    and `k` unless `from_zero` says they are the zero start) is batched whenever the
    loop is: `custom_linear_solve` batches its solve first with the right-hand side as
    it arrives, then batched (a hyperparameter's tangent is the same for every
    element), and with one pattern of batched operands (`nested_vmap`'s `per_task`)
    the second batching evaluates the first's jaxpr instead of tracing the loop again.
    """
    operands = (operator, y, r, k, target, enabled, b, second)
    dyn, static = eqx.partition(operands, eqx.is_array)

    def one(dyn):
        operator, y, r, k, target, enabled, b, second = eqx.combine(dyn, static)
        return _cg_loop(operator, None, y, r, k, target, max_steps, enabled, b, second)

    size = sum(leaf.size * leaf.dtype.itemsize for leaf in jtu.tree_leaves(y))

    def run(num_tasks, batched, gather, batch):
        lanes = _batching.backward_lanes(num_tasks, size)
        if b is None or lanes >= num_tasks or _batching.batch_is_split(batch, batched):
            return None
        return _lanes(static, max_steps, batched, gather, num_tasks, lanes)

    flags = (False, not from_zero, True, not from_zero, True, True, True, False)
    per_task = tuple(jtu.tree_map(lambda _, f=f: f, d) for f, d in zip(flags, dyn))
    return _batching.nested_vmap(one, dyn, run, per_task)


def _dependent_outputs(jaxpr, flags: list[bool]) -> list[bool]:
    """Which outputs of `jaxpr` may depend on its inputs where `flags` (through any of
    its operations: an over-approximation)."""
    var = jax.extend.core.Var
    marked = {v for v, flag in zip(jaxpr.invars, flags) if flag}
    for eqn in jaxpr.eqns:
        if any(isinstance(v, var) and v in marked for v in eqn.invars):
            marked.update(eqn.outvars)
    return [isinstance(v, var) and v in marked for v in jaxpr.outvars]


def _outputs_only(jaxpr, keep: list[bool]):
    """`jaxpr` with the outputs where `keep` and only the operations they need."""
    var = jax.extend.core.Var
    outvars = [v for v, k in zip(jaxpr.outvars, keep) if k]
    needed = {v for v in outvars if isinstance(v, var)}
    eqns = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            eqns.append(eqn)
            needed.update(v for v in eqn.invars if isinstance(v, var))
    effects = set().union(*(eqn.effects for eqn in eqns))
    return jaxpr.replace(eqns=eqns[::-1], outvars=outvars, effects=effects)


def _lanes(static, max_steps, batched, operands_of, num_tasks, num_lanes):
    """The unpreconditioned loop with a residual turn for a batch of `num_tasks`, in
    `num_lanes` refilled lanes (`_batching.run_lanes`); the same steps and products per
    element as `_cg_loop`.

    A lane's turn is one product: with $p$ while it steps, with $y$ for its residual
    turn, and (with a second operator) one more with $y$ after the lane is loaded again
    with the second operator. A lane holds its operator's arrays, set when it is loaded
    (for a second operator built by a linearisation, say, the linearisation runs only
    for the lanes being loaded); the operator's arrays that depend on no batched operand
    stay shared.
    """
    axes = jtu.tree_map(lambda flag: 0 if flag else None, batched)

    def task(d):
        return eqx.combine(d, static)

    def op_of(d, stage):
        operator, *_, second = task(d)
        return operator if second is None else second(stage)

    def make_op(d, stage):
        return jtu.tree_leaves(eqx.filter(op_of(d, stage), eqx.is_array))

    one = _batching.first_task(batched, operands_of)
    has_second = task(one)[-1] is not None
    stage0 = jnp.zeros((), jnp.int32)
    # One trace of the operator gives its structure and which of its arrays depend on
    # the element (or the stage): those are the lanes', the others are computed once.
    closed, shapes, op_static = eqx.filter_make_jaxpr(op_of)(one, stage0)
    op_treedef = jtu.tree_structure(shapes)
    own = _dependent_outputs(closed.jaxpr, jtu.tree_leaves((batched, True)))
    shared = None
    if not all(own):
        shared_only = _outputs_only(closed.jaxpr, [not o for o in own])
        run_shared = jax.extend.core.jaxpr_as_fun(
            jax.extend.core.ClosedJaxpr(shared_only, closed.consts)
        )
        shared = iter(run_shared(*jtu.tree_leaves((one, stage0))))
        shared = [None if o else next(shared) for o in own]

    def lane_op(leaves):
        if shared is not None:
            it = iter(leaves)
            leaves = [next(it) if o else s for o, s in zip(own, shared)]
        return eqx.combine(jtu.tree_unflatten(op_treedef, leaves), op_static)

    def own_op(d, stage):
        return [leaf for leaf, o in zip(make_op(d, stage), own) if o]

    def start(d):
        _, y, r, k, target, enabled, b, _ = task(d)
        carry = _initial(y, r, k)
        enabled = jnp.asarray(enabled, bool)
        return carry, (b, target, enabled), jnp.zeros((), carry[4].dtype)

    shape_op = [leaf for leaf, o in zip(jtu.tree_leaves(shapes), own) if o]
    shape_start = jax.eval_shape(start, one)
    zeros = lambda s: zeros_rows(num_lanes, s)  # noqa: E731
    state = (
        jtu.tree_map(zeros, shape_op),
        jtu.tree_map(zeros, shape_start),
        jnp.zeros(num_lanes, jnp.int32),  # stage: 0 steps and residual turn, 1 second product
        jnp.zeros(num_lanes, shape_start[2].dtype),  # the true residual's norm
    )

    def load(state, index, tasks, again):
        ops, (carry, data, second_norm), stage, true_norm = state
        d = operands_of(tasks)
        new_stage = jnp.zeros(index.shape, jnp.int32) if again is None else again.astype(jnp.int32)
        ops = _batching.put(ops, index, jax.vmap(own_op, in_axes=(axes, 0))(d, new_stage))
        stage = _batching.put(stage, index, new_stage)
        fresh = index if again is None else jnp.where(again, num_lanes, index)
        new_carry, new_data, _ = jax.vmap(start, in_axes=(axes,))(d)
        carry = _batching.put(carry, fresh, new_carry)
        data = _batching.put(data, fresh, new_data)
        return ops, (carry, data, second_norm), stage, true_norm

    def advance_lane(leaves, carry, data, stage, true_norm, second_norm):
        b, target, enabled = data
        go = (stage == 0) & _stepping(carry, enabled, target, max_steps)
        carry = _step_or_residual(lane_op(leaves), carry, go, b)
        # Where the lane took no step, `r` is now its true residual (stage 0) or the
        # second operator's (stage 1).
        norm = tree_norm2(carry[1])
        true_norm = jnp.where((stage == 0) & ~go, norm, true_norm)
        second_norm = jnp.where(stage == 1, norm, second_norm)
        again = (stage == 0) & ~go & has_second
        return carry, true_norm, second_norm, go | again, again

    def turn(tasks, state):
        ops, (carry, data, second_norm), stage, true_norm = state
        carry, true_norm, second_norm, held, again = jax.vmap(advance_lane)(
            ops, carry, data, stage, true_norm, second_norm
        )
        state = ops, (carry, data, second_norm), stage, true_norm
        return state, held, again if has_second else None

    def row(state):
        _, (carry, _, second_norm), _, true_norm = state
        y, _, _, _, rr, k, broke = carry
        return y, true_norm, k, broke, rr, second_norm

    shape_row = jax.eval_shape(row, jtu.tree_map(lambda a: a[0], state))
    out = jtu.tree_map(lambda s: zeros_rows(num_tasks, s), shape_row)
    out = _batching.run_lanes(num_tasks, num_lanes, state, load, turn, row, out, has_second)
    y, true_norm, k, broke, rr, second_norm = out
    return y, true_norm, k, broke, rr, second_norm if has_second else None
