"""`vmap_split`: `jax.vmap` over a batch split along an explicit mesh axis, each device
solving its own part of the batch."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.tree_util as jtu
from jax.sharding import AxisType, PartitionSpec as P


def _explicit_names(entry: Any, mesh: Any) -> tuple[str, ...]:
    """The explicit mesh axes that one entry of a `PartitionSpec` splits along."""
    if isinstance(entry, str):
        names = (entry,)
    elif isinstance(entry, tuple):
        names = entry
    else:  # None, or `P.UNCONSTRAINED`
        names = ()
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    return tuple(name for name in names if kinds.get(name) == AxisType.Explicit)


class _Plan:
    """What the arguments' types say: each leaf's `shard_map` spec, and the explicit mesh
    axes each batched and unbatched leaf is split along."""

    def __init__(self):
        self.batched = []  # (where, names its batch dimension is split along, mesh)
        self.unbatched = []  # (where, names it is split along)

    def spec(self, axis: int | None, path: Any, leaf: Any) -> Any:
        where = f"args{jtu.keystr(path)}"
        try:
            aval = jax.typeof(leaf)
        except TypeError:  # not an array: `jax.vmap` says what it thinks of it
            return P()
        sharding = getattr(aval, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        ndim = len(getattr(aval, "shape", ()))
        entries = tuple(getattr(sharding, "spec", ())) if mesh is not None else ()
        split = [_explicit_names(entry, mesh) for entry in entries]
        split += [()] * (ndim - len(split))
        if axis is None:
            self.unbatched.append((where, tuple(n for names in split for n in names)))
            return P()
        dim = axis + ndim if axis < 0 else axis
        if not 0 <= dim < ndim:  # `jax.vmap` says it is out of range
            return P()
        # Its other dimensions may be split along the mesh's other axes (a task's
        # parameters split across devices): those axes stay outside `shard_map`'s manual
        # ones, as they are for unbatched arguments.
        self.batched.append((where, split[dim], mesh))
        return P(*([None] * dim), _entry(split[dim])) if split[dim] else P()


def _entry(names: tuple[str, ...]) -> Any:
    return names[0] if len(names) == 1 else names


def _plan(args: tuple, in_axes: Any) -> tuple[_Plan, Any]:
    """Each leaf's spec for `jax.shard_map` (a tree like `args`), with what it found."""
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    if not isinstance(in_axes, tuple):
        in_axes = (in_axes,) * len(args)
    if len(in_axes) != len(args):
        raise ValueError(
            f"`lbfgs_implicit.vmap_split`: in_axes has {len(in_axes)} entries for "
            f"{len(args)} positional arguments."
        )
    plan = _Plan()

    def specs_of(path, axis, arg):
        return jtu.tree_map_with_path(lambda p, leaf: plan.spec(axis, path + p, leaf), arg)

    # `in_axes` is a prefix of `args`: `None` there is a leaf (unbatched), not an empty node.
    specs = jtu.tree_map_with_path(specs_of, in_axes, args, is_leaf=lambda x: x is None)
    return plan, specs


def vmap_split(fn: Callable[..., Any], in_axes: Any = 0) -> Callable[..., Any]:
    """`jax.vmap(fn, in_axes)` for a batch split across devices along an explicit mesh
    axis: each device runs `fn` on its own part of the batch.

    `jax.vmap` of [`lbfgs_implicit.optimize`][] cannot run over a batch split along a
    mesh axis with explicit sharding (`AxisType.Explicit`, the default of
    `jax.make_mesh` in recent JAX): it raises a `ValueError` that points here. This
    function writes the program that works from the arguments' types, so no
    `PartitionSpec` has to be spelled out:

    ```python
    jax.shard_map(jax.vmap(fn, in_axes), mesh=<the batch's mesh>,
                  in_specs=<P(axis) for batched leaves, P() for the others>,
                  out_specs=P(axis), axis_names={axis}, check_vma=False)
    ```

    Every device then traces and runs `fn`'s solves for its own tasks only, by turns in
    refilled lanes when its part of the batch is large enough (as on one device), and
    stops when its own solves are done instead of waiting for the slowest task of the
    whole batch. Results are those of `jax.vmap(fn, in_axes)` on one device, and come
    back split along the batch's axis, as do gradients with respect to split arguments.

    When no batched argument is split along an explicit axis on its batch dimension (one
    device, a replicated batch, or `AxisType.Auto` axes, whose splits types do not
    show), this is exactly `jax.vmap(fn, in_axes)`.

    **Arguments:**

    - `fn`: the function to map, taking positional arguments (keyword arguments are not
      passed through).
    - `in_axes`: as for `jax.vmap`: an integer, `None`, or a tuple with one entry per
      positional argument, each a prefix of that argument's pytree; `None` marks an
      argument (or a part of one) shared by all tasks. Outputs are always batched along
      their leading axis (`out_axes=0`).

    **Returns:**

    A function with `fn`'s positional arguments, each batched one with an extra axis at
    its `in_axes`; its outputs have a leading batch axis.

    **Requirements**, each checked with a `ValueError` that says what to change:

    - Every batched argument is split along the same explicit mesh axis (or tuple of
      axes) on its batch dimension. (JAX itself refuses arrays whose split dimension is
      not divisible by the axis size, so each device holds whole tasks.) Their other
      dimensions may be split along the mesh's other axes, as a task's parameters
      split across devices.
    - Unbatched arguments are not split along that axis: every task needs all of them.
    - `fn` closes over no array placed on the mesh (one created under `jax.set_mesh`,
      or an argument of an enclosing `jax.jit` there): `jax.shard_map` does not accept
      such closures. Pass them as unbatched arguments (`in_axes=None` for them) instead,
      as `lam` below.

    Call it inside `jax.jit` (JAX 0.10 cannot run a `shard_map` over some of a mesh's
    axes eagerly), with `throw=False` in the solves, as for any program on several
    devices (see the docs page on several devices).

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

        import lbfgs_implicit as li

        def ridge(w, args):
            X, y, lam = args
            return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)

        def solve(lam, X, y):  # one task
            return li.optimize(ridge, jnp.zeros(X.shape[1]), (X, y, lam), throw=False).params

        def loss(lam, X, Y):  # X: (tasks, rows, features), Y: (tasks, rows), split on "d"
            w = li.vmap_split(solve, in_axes=(None, 0, 0))(lam, X, Y)
            return jnp.mean(w**2)

        mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
        with jax.set_mesh(mesh):
            X = jax.device_put(X, NamedSharding(mesh, P("d", None, None)))
            Y = jax.device_put(Y, NamedSharding(mesh, P("d", None)))
            value, dlam = jax.jit(jax.value_and_grad(loss))(jnp.asarray(0.1), X, Y)
        ```
    """
    vmapped = jax.vmap(fn, in_axes=in_axes)

    @functools.wraps(fn)
    def batched(*args):
        plan, specs = _plan(args, in_axes)
        found = {names for _, names, _ in plan.batched}
        if not any(found):
            return vmapped(*args)
        if len(found) > 1:
            seen = ", ".join(
                f"{where} along {names!r}" if names else f"{where} not split"
                for where, names, _ in plan.batched
            )
            raise ValueError(
                "`lbfgs_implicit.vmap_split`: the batched arguments are split differently "
                f"on their batch dimensions ({seen}). Split all of them along the same "
                "explicit mesh axis, e.g. `jax.reshard(y, P('d'))`."
            )
        (names,) = found
        for where, used in plan.unbatched:
            if set(used) & set(names):
                raise ValueError(
                    f"`lbfgs_implicit.vmap_split`: the unbatched argument {where} is split "
                    f"along the batch's mesh axis {_entry(names)!r}, but every task needs "
                    "all of it. Replicate it, e.g. `jax.reshard(x, P())`."
                )
        mesh = next(mesh for _, used, mesh in plan.batched if used)
        per_device = jax.shard_map(
            vmapped,
            mesh=mesh,
            in_specs=specs,
            out_specs=P(_entry(names)),
            axis_names=set(names),
            # The solver's loops mix per-device values with shared ones (counters,
            # tolerances), which JAX's replication check would reject.
            check_vma=False,
        )
        try:
            return per_device(*args)
        except (NotImplementedError, ValueError) as error:
            # What JAX says when `fn` closes over an array on the mesh: `shard_map`
            # refuses the closure, or (a constant of an enclosing `jax.jit` under a
            # mesh with axes other than the batch's) its first operation refuses the
            # array's mesh inside the manual region (jax 0.10.2 and 0.12).
            if not any(
                text in str(error)
                for text in ("Closing over inputs to shard_map", "should match the aval mesh")
            ):
                raise
            raise ValueError(
                "`lbfgs_implicit.vmap_split`: the function closes over an array placed on "
                "the mesh (created under `jax.set_mesh`, or an argument of an enclosing "
                "`jax.jit` there), which `jax.shard_map` does not accept. Pass it as an "
                "unbatched argument instead: `vmap_split(fn, in_axes=(..., None))`. "
                f"(JAX: {str(error).splitlines()[0]})"
            ) from error

    return batched
