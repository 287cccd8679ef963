"""The train state created directly in its sharded layout on a device mesh."""

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec
import optax
from flax import nnx

from attnres_jax.model import Transformer
from attnres_jax.sharding import param_shardings
from attnres_jax.train.steps import TrainState, init_train_state


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, TrainState]:
  """Initialises parameters and optimiser state inside `jit`, each array born with its sharding.

  Parameter shardings come from their logical axes and `config.mesh.rules`; the
  optimiser moments follow their parameters; step and RNG are replicated.
  """
  make_model = lambda: Transformer(config.model, rngs=nnx.Rngs(config.train.seed))
  graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model), nnx.Param)
  shardings = param_shardings(abstract_params, mesh, config.mesh.rules)
  params = jax.jit(lambda: nnx.split(make_model(), nnx.Param)[1], out_shardings=shardings)()
  init = lambda p: init_train_state(p, tx, config.train.seed)
  state_sharding = _follow_params(jax.eval_shape(init, params), shardings, NamedSharding(mesh, PartitionSpec()))
  return graphdef, jax.jit(init, out_shardings=state_sharding)(params)


def _follow_params(tree, param_sharding, replicated: NamedSharding):
  """Shardings for `tree`: a leaf whose key path ends with a parameter's path (an optimiser
  moment, or the parameter itself) gets that parameter's sharding; every other leaf is replicated."""
  by_path = dict(jax.tree_util.tree_flatten_with_path(param_sharding)[0])

  def pick(path, _):
    return next((by_path[path[i:]] for i in range(len(path)) if path[i:] in by_path), replicated)

  return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: x.sharding, state)
