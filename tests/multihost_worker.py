"""One of two processes of 4 fake CPU devices each, for tests/test_sharding.py (a script, not collected by pytest).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python tests/multihost_worker.py --process_id=i --num_processes=2 --port=P --out=DIR

Each process, after `jax.distributed.initialize` on localhost:
1. before anything is compiled, checks that `check_mesh_fits` refuses meshes whose batch shards would take
   rows of both processes, or that give the processes unequal shares of the batch;
2. feeds its own rows of `TOKENS_BxT1` (rows p, p + P, ...: the rule of `attnres_jax.data.pipeline`) into the
   global batch with `jax.make_array_from_process_local_data`, as the train loop does, and checks that the
   shards on its devices hold only those rows;
3. computes the train loss and its gradients with `sharded_loss_and_grads` on the mesh (data=2, fsdp=2,
   tensor=2) over all 8 devices. Process 0 writes them, gathered, to DIR/grads.npz.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs; tests/ is sys.path[0]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from attnres_jax.sharding import batch_sharding, check_mesh_fits, make_mesh  # noqa: E402
from test_sharding import TOKENS_BxT1, flat_numpy, sharded_config, sharded_loss_and_grads  # noqa: E402

MESH = (2, 2, 2)


def check_bad_meshes_are_refused(compile_events: list[str]) -> None:
  """Meshes the two processes cannot feed raise a ValueError in `check_mesh_fits`, before any compile."""
  mine, theirs = ([d for d in jax.devices() if d.process_index == p] for p in (0, 1))
  alternating = [d for pair in zip(mine, theirs) for d in pair]  # the tensor pairs span both processes
  cases = [(sharded_config((1, 1, 8)), None, "rows 0-7 are held by devices of processes 0 and 1"),
           (sharded_config(MESH), alternating, "rows 0-1 are held by devices of processes 0 and 1"),
           (sharded_config((4, 1, 1)), None, "the 2 processes hold [4, 0] of the 4 batch shards")]
  for config, devices, message in cases:
    mesh = make_mesh(config.mesh, devices)
    try:
      check_mesh_fits(config, mesh)
    except ValueError as error:
      assert message in str(error) and str(error).startswith("config.mesh=("), error
    else:
      raise AssertionError(f"mesh {dict(mesh.shape)} of devices {mesh.devices.ravel()} was not refused")
  assert not compile_events, compile_events


def feed_own_rows(mesh, rules) -> jax.Array:
  """The global batch from this process's rows, as the train loop builds it; its shards here hold only them."""
  index, count = jax.process_index(), jax.process_count()
  local_BxT1 = TOKENS_BxT1[index::count]
  batch_BxT1 = jax.make_array_from_process_local_data(batch_sharding(mesh, rules), local_BxT1)
  assert batch_BxT1.shape == TOKENS_BxT1.shape, batch_BxT1.shape
  own = {row.tobytes() for row in local_BxT1}
  for shard in batch_BxT1.addressable_shards:
    assert shard.device.process_index == index, shard.device
    foreign = [row for row in np.asarray(shard.data) if row.tobytes() not in own]
    assert not foreign, f"process {index}: shard {shard.index} on {shard.device} holds rows of another process"
  gathered = multihost_utils.process_allgather(batch_BxT1, tiled=True)
  np.testing.assert_array_equal(np.unique(gathered, axis=0), np.unique(TOKENS_BxT1, axis=0))
  return batch_BxT1


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  jax.distributed.initialize(coordinator_address=f"localhost:{args.port}", num_processes=args.num_processes,
                             process_id=args.process_id)
  assert jax.process_count() == 2 and jax.local_device_count() == 4 and jax.device_count() == 8, jax.devices()
  compile_events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: compile_events.append(event) if "compile" in event else None)

  check_bad_meshes_are_refused(compile_events)
  config = sharded_config(MESH)
  mesh = make_mesh(config.mesh)
  check_mesh_fits(config, mesh)
  batch_BxT1 = feed_own_rows(mesh, config.mesh.rules)
  loss, grads = multihost_utils.process_allgather(sharded_loss_and_grads(config, mesh, batch_BxT1), tiled=True)
  assert compile_events, "the compile listener saw nothing: the check before compiling proved nothing"
  if jax.process_index() == 0:
    np.savez(os.path.join(args.out, "grads.npz"), loss=loss, **flat_numpy(grads))
  print(f"process {jax.process_index()}: loss {float(loss):.6f}", flush=True)


if __name__ == "__main__":
  main()
