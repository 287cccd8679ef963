"""Figure 6: Block AttnRes at 32 sublayers with block size S, e.g. `--config=configs/ablations/block_size.py:8`.

S = 1, 2, 4, 8, 16, 32 are the paper's sweep (S = 1 is Full AttnRes).
"""

from configs.ablations.common import ablation_config


def get_config(block_size: str = "4"):
  return ablation_config(residual="block", block_size=int(block_size))
