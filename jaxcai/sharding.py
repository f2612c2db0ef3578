"""Meshes and the logical-to-mesh axis rules.

Model code names array axes logically (`batch`, `embed`, `heads`, ...); a rules table maps
each logical name to mesh axes (`data`, `fsdp`, `tensor`). A name may have several rules:
the first whose mesh axes are still free in that array's spec wins (so `embed` can be
FSDP-sharded in a weight but replicated in an activation whose `batch` already uses
`fsdp`). A logical name with no rule at all is an error, never a silent replication.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Data parallel over `data` and `fsdp`, weights sharded over `fsdp` (ZeRO-3 style) and
# Megatron-style tensor parallelism over `tensor`.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("cache_length", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the `data`, `fsdp` and `tensor` mesh axes; one of them may be -1 (the rest)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig {self}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig {self}: axis sizes must be positive or -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(
                    f"MeshConfig {self}: {n_devices} devices are not divisible by {known}"
                )
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(
                f"MeshConfig {self}: mesh of {math.prod(sizes)} devices, but {n_devices} "
                "devices are available"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes (`data`, `fsdp`, `tensor`) over all (or the given) devices."""
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    # Auto axes: shardings propagate through jit (GSPMD) and constraints are hints.
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Resolve logical axis names to a `PartitionSpec`; raise on a name without a rule.

    For each name, the first rule whose mesh axes are unused so far in this spec wins.
    Given `shape` and `mesh`, a rule whose mesh axes do not divide the dimension is
    skipped too (a vocabulary of 32001 cannot be split in two), falling through to the
    next rule for that name, and finally to no sharding of that dimension.
    """
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        candidates = [axes for logical, axes in rules if logical == name]
        if not candidates:
            raise KeyError(
                f"logical axis {name!r} (in {tuple(names)}) has no sharding rule; "
                f"rules cover {sorted({logical for logical, _ in rules})}"
            )
        chosen: MeshAxes = None
        for axes in candidates:
            mesh_axes = _axes_tuple(axes)
            fits = (
                shape is None
                or mesh is None
                or (shape[i] % math.prod(mesh.shape[a] for a in mesh_axes) == 0)
            )
            if used.intersection(mesh_axes) or not fits:
                continue
            chosen = axes
            used.update(mesh_axes)
            break
        spec.append(chosen)
    return PartitionSpec(*spec)


def named_sharding(
    names: Sequence[str | None],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
    what: str = "array",
) -> NamedSharding:
    """`NamedSharding` for one array from its logical names (see `logical_to_spec`).

    With `shape`, a dimension left whole only because its mesh axes do not divide it is
    reported in a warning naming `what`.
    """
    spec = logical_to_spec(names, rules, shape, mesh)
    if shape is not None:
        unfitted = logical_to_spec(names, rules)
        if unfitted != spec:
            log.warning(
                "%s of shape %s: sharding %s does not divide it; using %s",
                what,
                tuple(shape),
                unfitted,
                spec,
            )
    return NamedSharding(mesh, spec)


def tree_shardings(logical_tree: Any, shapes: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Map a tree of logical-name tuples (and a matching tree of shapes) to shardings."""
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, str | None) for n in x)
    paths_names, treedef = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=is_names)
    shape_leaves = treedef.flatten_up_to(shapes)
    out = []
    for (path, names), shaped in zip(paths_names, shape_leaves, strict=True):
        what = f"parameter {jax.tree_util.keystr(path)}"
        out.append(named_sharding(names, mesh, rules, getattr(shaped, "shape", shaped), what))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----- activation constraints ---------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxcai_sharding", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Make `mesh` and `rules` current: functions traced inside constrain activations."""
    token = _ACTIVE.set((mesh, tuple(tuple(r) for r in rules)))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def current() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) set by `use_mesh`, or None outside it."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names under `use_mesh`; identity outside it.

    Unknown names raise even outside a mesh, so a typo cannot hide until the first
    multi-device run. A dimension its mesh axes do not divide is left unsharded.
    """
    active = current()
    rules = DEFAULT_RULES if active is None else active[1]
    if active is None:
        logical_to_spec(names, rules)
        return x
    mesh = active[0]
    # An activation dimension its mesh axes cannot divide (a batch of 1 while sampling on
    # 8 devices, say) falls through to the next rule, or stays whole.
    spec = logical_to_spec(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
