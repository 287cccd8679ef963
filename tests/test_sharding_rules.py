"""Sharding rules at the paper's sizes: nothing large is replicated (docs/method.md §13)."""

import math

import jax
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from attnres_jax.sharding import logical_to_spec, replicated_parameters, replication_warnings
from attnres_jax.train.state import abstract_train_state
from configs import base, scaling


def fsdp_mesh(fsdp: int) -> AbstractMesh:
  return AbstractMesh((1, fsdp, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def nbytes(x, shape) -> int:
  return math.prod(shape) * x.dtype.itemsize


@pytest.mark.parametrize("size", sorted(scaling.PAPER))
@pytest.mark.parametrize("fsdp", [16, 32, 64])
def test_paper_sizes_shard_parameters_and_moments_over_fsdp(size, fsdp):
  """Per device, parameters and AdamW moments take at most 1.1x their total / fsdp (d_model = 1168 or
  1264 does not divide by 32: the fallback rules shard the MLP, vocabulary and head-channel dimensions)."""
  config = scaling.get_config(size)
  _, state = abstract_train_state(config, fsdp_mesh(fsdp), optax.adamw(1e-3))
  leaves = jax.tree.leaves((state.params, state.opt_state))
  total = sum(nbytes(x, x.shape) for x in leaves)
  per_device = sum(nbytes(x, x.sharding.shard_shape(x.shape)) for x in leaves)
  assert per_device <= 1.1 * total / fsdp, (size, fsdp, per_device / (total / fsdp))


def test_later_rules_are_fallbacks_and_an_axis_is_used_once():
  rules = (("embed", "fsdp"), ("mlp", "tensor"), ("mlp", "fsdp"))
  sizes = {"data": 1, "fsdp": 4, "tensor": 2}
  assert logical_to_spec(("embed", "mlp"), (8, 6), rules, sizes) == PartitionSpec("fsdp", "tensor")
  assert logical_to_spec(("embed", "mlp"), (6, 8), rules, sizes) == PartitionSpec(None, ("tensor", "fsdp"))
  assert logical_to_spec(("embed", "mlp"), (6, 6), rules, sizes) == PartitionSpec(None, "tensor")
  assert logical_to_spec(("mlp", "embed"), (8, 8), rules, sizes) == PartitionSpec("tensor", "fsdp")


def test_replicated_parameters_names_what_the_rules_leave_whole():
  """Without the fallback rules, paper-436M's layer weights are replicated on 32 devices, and named."""
  config = scaling.get_config("paper-436M")
  mesh = fsdp_mesh(32)
  _, state = abstract_train_state(config, mesh, optax.adamw(1e-3))
  assert replicated_parameters(state.params) == [] and replication_warnings(state.params) == []
  config.mesh.rules = base.get_config().mesh.rules[:-3]  # the primary rules only
  _, state = abstract_train_state(config, mesh, optax.adamw(1e-3))
  named = dict(replicated_parameters(state.params))
  assert any("layers/mlp/gate is not sharded" in line for line in replication_warnings(state.params))
  assert {"layers/mlp/gate", "layers/attention/query", "embedding"} <= set(named)
  assert named["layers/mlp/gate"] == 16 * 1168 * 3200 * 4  # float32, whole on every device
