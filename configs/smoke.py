"""A run that trains, evaluates and checkpoints in seconds (tests, quick checks)."""

from configs import base


def get_config():
  config = base.get_config()
  config.model.update(dict(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, block_size=2))
  config.data.update(dict(seq_len=32, global_batch_size=4))
  config.optim.warmup_steps = 2
  config.mesh.data = 1  # one device, whatever the machine has
  config.train.update(dict(num_steps=12, log_every=2, eval_every=6, eval_batches=2, checkpoint_every=4))
  return config
