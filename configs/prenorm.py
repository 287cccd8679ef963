"""The PreNorm baseline: the standard residual stream."""

from configs import base


def get_config():
  config = base.get_config()
  config.model.residual = "prenorm"
  return config
