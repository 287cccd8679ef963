"""Device meshes from the config and logical-axis sharding rules (MaxText style).

Mesh axes are `data`, `fsdp`, `expert` and `tensor`. Every parameter carries
logical axis names (`attnres_jax.axes`); `config.mesh.rules` maps each name to
mesh axes, in order, later rules for a name being fallbacks (`logical_to_spec`);
an unnamed or unmapped axis is replicated, and so is a dimension the mapped mesh
axes do not divide. `expert` splits the MoE experts and, like `data`, the batch
(docs/method.md §16); other weights are replicated over it. Parameters still
replicated are named at start-up (`replicated_parameters`). Activations are
constrained at sublayer boundaries through the same rules: batch over
data+fsdp+expert, heads and MLP hidden over tensor. The AttnRes depth sources
are activations; pseudo-queries and key gains (`depth_embed`) stay replicated.

Axis types: **Auto**, deliberately. With Auto, GSPMD propagates shardings
through the custom-VJP depth scan, `nnx.merge` inside it and
`jax.nn.dot_product_attention`, and our `with_sharding_constraint` hints fix
the layout at layer boundaries; a reduction over a `tensor`-sharded d (the key
RMSNorm, the depth logits) becomes an all-reduce automatically, so it stays
exact. jax's default, Explicit, would need `out_sharding=` on every einsum that
contracts a sharded dimension, inside the custom VJP's forward and backward too.
"""

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from attnres_jax import axes

MESH_AXES = ("data", "fsdp", "expert", "tensor")
Rules = Sequence[tuple[str, str | Sequence[str] | None]]
_active: list[tuple[jax.sharding.Mesh, Rules] | None] = [None]  # (mesh, rules) that `constrain` applies


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Sizes of the `MESH_AXES`; one of them may be -1: all devices the others leave.

  Without a -1 the mesh may use fewer devices than there are (the first ones).
  """
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh ({', '.join(MESH_AXES)})={tuple(sizes)}: positive sizes, at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes' {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) > num_devices:
    raise ValueError(f"config.mesh ({', '.join(MESH_AXES)})={tuple(sizes)} needs {math.prod(sizes)} devices, "
                     f"found {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices[:math.prod(shape)])


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Rules,
                    mesh_sizes: dict[str, int]) -> PartitionSpec:
  """The mesh PartitionSpec of an array with logical axis `names`, under `rules`, applied in order.

  A rule `(name, mesh_axes)` shards each dimension called `name` over
  `mesh_axes` when none of them is used yet by this array and, with what
  earlier rules gave that dimension, they divide it; otherwise it is skipped.
  So a later rule for a name is a fallback: `("mlp", "fsdp")` after
  `("embed", "fsdp")` shards a weight's MLP dimension over fsdp exactly when
  d_model does not divide by it (and the weight would otherwise be replicated).
  Mesh axes that `mesh_sizes` lacks (a mesh built without `expert`) are left out of the rules.
  """
  used: set[str] = set()
  dims: list[tuple[str, ...]] = [() for _ in names]
  for rule_name, mapped in rules:
    rule_axes = tuple(a for a in ((mapped,) if isinstance(mapped, str) else mapped or ()) if a in mesh_sizes)
    for i, (name, size) in enumerate(zip(names, shape)):
      if name != rule_name or not rule_axes or used.intersection(rule_axes):
        continue
      if size % math.prod(mesh_sizes[a] for a in dims[i] + rule_axes) == 0:
        dims[i] += rule_axes
        used.update(rule_axes)
  return PartitionSpec(*(None if not d else d[0] if len(d) == 1 else d for d in dims))


def param_shardings(params: nnx.State, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.State:
  """NamedSharding of every parameter from its logical axis names (`out_sharding` metadata)."""
  rules, sizes = tuple(rules), dict(mesh.shape)

  def sharding(variable):
    names = variable.get_metadata().get("out_sharding") or (None,) * np.ndim(variable.get_value())
    return variable.replace(NamedSharding(mesh, logical_to_spec(names, np.shape(variable.get_value()),
                                                               rules, sizes)))

  return jax.tree.map(sharding, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_parameters(params: nnx.State, *, over: Sequence[str] = ("fsdp", "tensor"),
                          min_bytes: int = 2**20) -> list[tuple[str, int]]:
  """(path, bytes per device) of each parameter held more than 1.1x over its share of the `over` axes.

  `params` are arrays or `jax.ShapeDtypeStruct`s with shardings. The share is
  total bytes / the size of the `over` mesh axes (data-parallel replicas are
  intended). Only arrays holding at least `min_bytes` per device are named;
  largest first.
  """
  found = []
  for path, variable in nnx.to_flat_state(params):
    x = variable.get_value()
    per_device = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    share = math.prod(x.shape) * x.dtype.itemsize / math.prod(x.sharding.mesh.shape[a] for a in over)
    if per_device >= min_bytes and per_device > 1.1 * share:
      found.append(("/".join(map(str, path)), per_device))
  return sorted(found, key=lambda item: -item[1])


def replication_warnings(params: nnx.State) -> list[str]:
  """One line per large parameter `replicated_parameters` finds, for a run's start-up output."""
  return [f"warning: parameter {path} is not sharded over fsdp x tensor: {per_device / 2**20:,.1f} MiB on "
          f"every device (with its optimiser moments, 3x that); add a rule for one of its axes to "
          f"config.mesh.rules" for path, per_device in replicated_parameters(params)]


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
  """Sharding of a `[B, T + 1]` token batch: batch over the axes of the first rule for `batch`."""
  return NamedSharding(mesh, PartitionSpec(_batch_axes(rules) or None, None))


def check_mesh_fits(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, process_count: int | None = None,
                    process_of: Callable[[jax.Device], int] = lambda device: device.process_index) -> None:
  """Every micro-batch splits over the batch axes, every process feeds whole batch shards of its own, and the
  expert axis splits whole MoE experts.

  Each process loads its own rows of the global `[B, T + 1]` batch and
  `jax.make_array_from_process_local_data` puts them on its devices. So each
  batch shard (a distinct slice of rows) must live on devices of one process
  only, and every process must hold the same number of whole shards. Read off
  the batch sharding's device-to-rows map and `process_of(device)`, compiling
  nothing. `process_count` (default `jax.process_count()`) and `process_of`
  can be faked to check a multi-host layout in one process.
  """
  sizes = dict(mesh.shape)
  where = f"config.mesh=({', '.join(f'{axis}={sizes[axis]}' for axis in MESH_AXES)})"
  experts = config.model.moe.num_experts
  if config.model.ffn == "moe" and experts % sizes.get("expert", 1):
    raise ValueError(f"{where}: config.model.moe.num_experts={experts} must be divisible by the expert axis "
                     "(each device holds whole experts)")
  batch_axes = [a for a in _batch_axes(config.mesh.rules) if sizes.get(a, 1) > 1]
  batch_devices = math.prod(sizes[a] for a in batch_axes)
  global_batch, accum = config.data.global_batch_size, config.optim.grad_accum_steps
  if (global_batch // accum) % batch_devices:
    raise ValueError(f"config.data.global_batch_size={global_batch}: each of the {accum} micro-batches must "
                     f"split over {' x '.join(batch_axes)} = {batch_devices} devices")
  process_count = jax.process_count() if process_count is None else process_count
  sharding = batch_sharding(mesh, config.mesh.rules)
  processes_of_rows: dict[tuple[int, int], set[int]] = {}
  for device, index in sharding.devices_indices_map((global_batch, config.data.seq_len + 1)).items():
    rows = index[0].indices(global_batch)[:2]
    processes_of_rows.setdefault(rows, set()).add(process_of(device))
  replicated_over = [a for a in MESH_AXES if sizes[a] > 1 and a not in _batch_axes(config.mesh.rules)]
  for (start, stop), processes in sorted(processes_of_rows.items()):
    if len(processes) > 1:
      raise ValueError(
          f"{where}: batch shard rows {start}-{stop - 1} are held by devices of processes "
          f"{' and '.join(map(str, sorted(processes)))}; each process feeds its own rows of the global batch, so "
          f"one shard would receive rows of several processes. The devices of one batch shard (its replicas over "
          f"{' x '.join(replicated_over) or 'no axis'}) must belong to one process: put those axes inside a host "
          f"(no larger than its devices, the mesh's devices ordered host by host), or map `batch` to more mesh "
          f"axes in config.mesh.rules.")
  shards = [sum(processes == {p} for processes in processes_of_rows.values()) for p in range(process_count)]
  if len(set(shards)) > 1:
    raise ValueError(
        f"{where}: the {process_count} processes hold {shards} of the {len(processes_of_rows)} batch shards; "
        f"each process feeds {global_batch} / {process_count} rows, so each must hold the same number of whole "
        f"shards. Use a mesh over all processes' devices, as many from each.")


def _batch_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes of the first rule for the logical batch axis."""
  mapped = next((mapped for name, mapped in rules if name == axes.BATCH), None)
  return (mapped,) if isinstance(mapped, str) else tuple(mapped or ())


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
  """Within this context, code traced by `jit` constrains activations to `mesh` by `rules`.

  No global mesh is set: with Auto axes, concrete NamedShardings on the inputs
  and on the constraints are all GSPMD needs.
  """
  _active.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    _active.pop()


def active_mesh() -> jax.sharding.Mesh | None:
  """The mesh of the innermost `activate`, or None outside one."""
  return None if _active[-1] is None else _active[-1][0]


def activation_spec(names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
  """The spec `constrain` gives an activation with logical axis `names` inside `activate`."""
  mesh, rules = _active[-1]
  return logical_to_spec(names, shape, rules, dict(mesh.shape))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding hint for an activation with logical axis `names`; a no-op outside `activate`."""
  if _active[-1] is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(_active[-1][0], activation_spec(names, x.shape)))


def map_batch_shards(fn, batched: Sequence[jax.Array], batch_dims: Sequence[int], replicated: Sequence[jax.Array],
                     out_batch_dims: Sequence[int]):
  """`fn(*batched, *replicated)`, run per device on its batch shard when a mesh is active.

  For kernels GSPMD cannot partition (a Pallas call would otherwise be
  gathered onto every device). `batched[i]` is split over the mesh axes of
  `batch` along `batch_dims[i]`, and so are the outputs along `out_batch_dims`.
  `replicated` inputs are tiled over a leading shard axis, so that autodiff sums
  their per-shard cotangents. Outside `activate`, or when the batch does not
  divide, `fn` runs as is.
  """
  mesh_axes = _batch_mesh_axes()
  num_shards = math.prod(_active[-1][0].shape[a] for a in mesh_axes) if mesh_axes else 1
  if num_shards == 1 or any(x.shape[d] % num_shards for x, d in zip(batched, batch_dims)):
    return fn(*batched, *replicated)
  along = lambda ndim, dim: PartitionSpec(*[mesh_axes if i == dim else None for i in range(ndim)])
  tiled = [jnp.broadcast_to(x, (num_shards,) + jnp.shape(x)) for x in replicated]

  def local(*args):
    return fn(*args[:len(batched)], *(x[0] for x in args[len(batched):]))

  in_specs = tuple(along(x.ndim, d) for x, d in zip(batched, batch_dims)) + tuple(along(x.ndim, 0) for x in tiled)
  out_shapes = jax.eval_shape(fn, *batched, *replicated)
  out_specs = jax.tree.map(lambda s, d: along(len(s.shape), d), out_shapes, tuple(out_batch_dims))
  return jax.shard_map(local, mesh=_active[-1][0], in_specs=in_specs, out_specs=out_specs, check_vma=False)(
      *batched, *tiled)


def _batch_mesh_axes() -> tuple[str, ...]:
  """The mesh axes (of size > 1) that the active rules give the batch axis; () outside `activate`."""
  if _active[-1] is None:
    return ()
  mesh, rules = _active[-1]
  return tuple(a for a in _batch_axes(rules) if mesh.shape[a] > 1)
