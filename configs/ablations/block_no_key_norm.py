"""Table 4: Block AttnRes (S = 4) without the key RMSNorm."""

from configs.ablations.common import ablation_config


def get_config():
  return ablation_config(residual="block", depth_key_norm=False)
