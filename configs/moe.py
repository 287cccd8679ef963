"""A CPU-sized Mixture-of-Experts Block AttnRes model (docs/method.md §16): trains in minutes on 2 cores.

The default model's shape with its SwiGLU replaced by 8 routed experts (top-2)
and 1 shared expert, each 128 wide: per token it multiplies as many FFN
weights (3 experts x 128 = the dense width 384) as `configs/block.py`, with
2.5x its FFN parameters. The first layer stays dense, 384 wide.
"""

from configs import base


def get_config():
  config = base.get_config()
  dense_width = config.model.d_ff
  config.model.update(dict(residual="block", block_size=2, ffn="moe", d_ff=128))
  config.model.moe.update(dict(num_experts=8, top_k=2, num_shared_experts=1, dense_layers=1, dense_d_ff=dense_width))
  return config
