"""The train state, described abstractly (shapes, dtypes, shardings) or created in its sharded layout."""

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec
import optax
from flax import nnx

from attnres_jax.model.transformer import Transformer
from attnres_jax.sharding import param_shardings
from attnres_jax.train.steps import TrainState, init_train_state


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
  """The train state as `jax.ShapeDtypeStruct`s carrying their shardings; nothing is allocated.

  Parameter shardings come from their logical axes and `config.mesh.rules`; the
  optimiser moments follow their parameters; step and RNG are replicated. A
  restore target: a restart reads the checkpoint into these without building a
  fresh state first.
  """
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: _make_model(config)), nnx.Param)
  shardings = param_shardings(abstract_params, mesh, config.mesh.rules)
  shapes = jax.eval_shape(lambda p: init_train_state(p, tx, config.train.seed), abstract_params)
  state_sharding = _follow_params(shapes, shardings, NamedSharding(mesh, PartitionSpec()))
  return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                shapes, state_sharding)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
  """Initialises parameters, then the optimiser state, inside `jit`, each array born with its sharding."""
  graphdef, abstract = abstract_train_state(config, mesh, tx)
  sharding = state_shardings(abstract)
  params = jax.jit(lambda: nnx.split(_make_model(config), nnx.Param)[1], out_shardings=sharding.params)()
  init = lambda p: init_train_state(p, tx, config.train.seed)
  return graphdef, jax.jit(init, out_shardings=sharding)(params)


def _make_model(config: ml_collections.ConfigDict) -> Transformer:
  return Transformer(config.model, rngs=nnx.Rngs(config.train.seed))


def _follow_params(tree, param_sharding, replicated: NamedSharding):
  """Shardings for `tree`: a leaf whose key path ends with a parameter's path (an optimiser
  moment, or the parameter itself) gets that parameter's sharding; every other leaf is replicated."""
  by_path = dict(jax.tree_util.tree_flatten_with_path(param_sharding)[0])

  def pick(path, _):
    return next((by_path[path[i:]] for i in range(len(path)) if path[i:] in by_path), replicated)

  return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: x.sharding, state)
