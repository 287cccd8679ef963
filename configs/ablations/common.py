"""The ablation model of docs/method.md §8 at CPU scale: 32 sublayers, Block N = 8 (S = 4)."""

from configs import base


def ablation_config(**model_overrides):
  config = base.get_config()
  config.model.update(dict(num_layers=16, block_size=4))
  config.model.update(model_overrides)
  return config
