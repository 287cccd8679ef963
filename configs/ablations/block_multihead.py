"""Table 4: Block AttnRes (S = 4) with 16 depth heads, one softmax per channel group of d / 16."""

from configs.ablations.common import ablation_config


def get_config():
  return ablation_config(residual="block", depth_heads=16)
