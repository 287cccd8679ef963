"""Compiled temp memory of a training step is bounded by the buffer slots it must hold (docs/method.md §7).

For PreNorm, Block (N = 8), two-phase Block and Full AttnRes (N = L) at 32
sublayers, remat full, the temp bytes XLA allocates for `value_and_grad` of the
next-token loss satisfy

    temp <= temp_PreNorm + SLOT_COPIES * N * B * T * d * 4 bytes

- `temp_PreNorm`: the same model with a plain residual stream, compiled here
  (every sublayer's own activations, the saved layer inputs, the logits);
- `N * B * T * d * 4`: one float32 source buffer `[N, B, T, d]`;
- `SLOT_COPIES = 4.5` buffers: the final buffer kept for the backward, the
  buffer's cotangent carried by the reverse scan, and the two token-major
  copies XLA makes of a buffer for the weighted sum's dot (`[M, N, d]`, and
  `[M, d, N]` for its transpose in the backward), and half a buffer of slack.
  Measured: 2.6 buffers for Block, 3.1 for Full (4.05 with jax 0.12). A step
  that reads the buffer it has just written in place makes XLA copy it again:
  Full, sealing before its second sublayer's mix, took 5.4.
"""

import jax
import pytest
from flax import nnx

from attnres_jax import Transformer
from attnres_jax.train.loss import next_token_loss
from configs import base

NUM_LAYERS, BATCH, LENGTH, WIDTH = 16, 1, 128, 128  # 32 sublayers
SLOT_COPIES = 4.5


def temp_bytes(**overrides) -> int:
  """Compiled temp bytes of one fwd+bwd step at the module's shape, remat full."""
  config = base.get_config().model
  config.update(dict(num_layers=NUM_LAYERS, d_model=WIDTH, num_heads=WIDTH // 64, num_kv_heads=WIDTH // 64,
                     remat="full", **overrides))
  graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
  tokens_BxT1 = jax.ShapeDtypeStruct((BATCH, LENGTH + 1), jax.numpy.int32)
  loss = lambda p, t: next_token_loss(nnx.merge(graphdef, p), t)
  return jax.jit(jax.value_and_grad(loss)).lower(params, tokens_BxT1).compile().memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def prenorm_temp() -> int:
  return temp_bytes(residual="prenorm")


@pytest.mark.parametrize("overrides,num_slots", [
    (dict(residual="block", block_size=4), 8),
    (dict(residual="block", block_size=4, two_phase=True), 8),
    (dict(residual="full"), 2 * NUM_LAYERS)], ids=["block", "block_two_phase", "full"])
def test_temp_memory_is_bounded_by_buffer_slots(prenorm_temp, overrides, num_slots):
  buffer_bytes = num_slots * BATCH * LENGTH * WIDTH * 4
  temp = temp_bytes(**overrides)
  assert temp <= prenorm_temp + SLOT_COPIES * buffer_bytes, (
      f"temp {temp / 2**20:.1f} MiB = PreNorm {prenorm_temp / 2**20:.1f} MiB + "
      f"{(temp - prenorm_temp) / buffer_bytes:.2f} buffers of {buffer_bytes / 2**20:.1f} MiB, over {SLOT_COPIES}")
