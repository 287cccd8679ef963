"""Block AttnRes with about 4 blocks at the default depth (paper: about 8 at scale)."""

from configs import base


def get_config():
  config = base.get_config()
  config.model.residual = "block"
  config.model.block_size = 2
  return config
