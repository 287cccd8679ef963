"""Table 4: Full AttnRes with sigmoid weights instead of the softmax over sources."""

from configs.ablations.common import ablation_config


def get_config():
  return ablation_config(residual="full", depth_normalization="sigmoid")
