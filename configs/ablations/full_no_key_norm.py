"""Table 4: Full AttnRes without the key RMSNorm (k_i = v_i)."""

from configs.ablations.common import ablation_config


def get_config():
  return ablation_config(residual="full", depth_key_norm=False)
