"""Table 4: the last 8 outputs plus the embedding (Full AttnRes with a depth window)."""

from configs.ablations.common import ablation_config


def get_config():
  return ablation_config(residual="full", depth_window=8)
