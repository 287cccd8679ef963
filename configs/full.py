"""Full AttnRes: every sublayer attends to the embedding and all earlier outputs."""

from configs import base


def get_config():
  config = base.get_config()
  config.model.residual = "full"
  return config
