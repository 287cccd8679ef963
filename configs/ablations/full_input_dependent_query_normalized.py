"""Our variant of Table 4's input-dependent query: q_l = w_l + W_l RMSNorm(h) (docs/method.md §12.4)."""

from configs.ablations.common import ablation_config


def get_config():
  return ablation_config(residual="full", depth_query_projection=True, depth_query_norm=True)
