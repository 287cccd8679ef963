"""The scaling family of docs/method.md §9 and §12.12: `--config=configs/scaling.py:SIZE`.

`paper-194M` .. `paper-528M` are the paper's five shapes (Table 2: layers,
heads = layers, d_model, learning rate, context 8192, tokens) as dense models
with 128-channel heads (d_model / heads is not an integer there): the paper's
are mixture-of-experts, so `d_ff` here is the dense SwiGLU width 8/3 d
(rounded up to a multiple of 128, so that it shards over fsdp where d_model
does not) and the parameter counts differ; they read the user's token files,
run flash attention where there is one (`attention_impl=auto`) and a chunked
loss; `paper-194M-moe` .. `paper-528M-moe` are MoE versions of equal active
parameters (`MOE` below). `cpu-1` .. `cpu-5`
keep the ratios (heads = layers, d_model / layers = 16, d_ff / d_model = 8/3,
tokens growing faster than parameters) scaled down until the smallest trains in
a few minutes on a 2-core CPU. Block AttnRes uses about 8 blocks at the paper's
sizes; the CPU sizes have too few sublayers (4 .. 12) for 8 blocks to differ
from Full AttnRes (S would round to 1), so there a block is one transformer
layer (S = 2, N = layers). The residual rule is set per run (`--config.model.residual`).
"""

from configs import base

# name: (layers, d_model, peak_lr, context, batch, steps)
PAPER = {
    "paper-194M": (12, 896, 2.99e-3, 8192, 256, 18_450),  # steps: the paper's tokens / (context x batch)
    "paper-241M": (13, 960, 2.80e-3, 8192, 256, 21_650),
    "paper-296M": (14, 1024, 2.50e-3, 8192, 256, 29_610),
    "paper-436M": (16, 1168, 2.20e-3, 8192, 256, 41_910),
    "paper-528M": (17, 1264, 2.02e-3, 8192, 256, 56_740),
}
CPU = {
    "cpu-1": (2, 32, 4e-3, 128, 16, 200),
    "cpu-2": (3, 48, 3.5e-3, 128, 16, 300),
    "cpu-3": (4, 64, 3e-3, 128, 16, 450),
    "cpu-4": (5, 80, 2.5e-3, 128, 16, 650),
    "cpu-5": (6, 96, 2e-3, 128, 16, 900),
}
SIZES = {**PAPER, **CPU}
MOE_SUFFIX = "-moe"
# MoE versions of the paper's sizes (`paper-436M-moe`; our choice, the paper does not state it): 64 routed
# experts, top-6, 1 shared, the first layer dense, sigmoid scores with the auxiliary-loss-free bias
# (DeepSeek-V3 / Moonlight style); each expert is 8/3 d / 7 wide (rounded up to 128), so that a token's
# 6 + 1 experts multiply as many weights as the dense stand-in's SwiGLU: equal active parameters.
MOE = dict(num_experts=64, top_k=6, num_shared_experts=1, dense_layers=1, score_function="sigmoid",
           aux_loss_coef=1e-4)


def get_config(size: str = "cpu-1"):
  moe = size.endswith(MOE_SUFFIX) and size[:-len(MOE_SUFFIX)] in PAPER
  shape = size[:-len(MOE_SUFFIX)] if moe else size
  if shape not in SIZES:
    raise ValueError(f"configs/scaling.py:{size}: unknown size; one of {sorted(SIZES)}, or a paper size with "
                     f"{MOE_SUFFIX!r}")
  layers, d_model, peak_lr, context, batch, steps = SIZES[shape]
  config = base.get_config()
  multiple = 128 if shape in PAPER else 16  # 128: the MLP width divides by fsdp = 16, 32, 64 and the MXU tile
  config.model.update(dict(num_layers=layers, num_heads=layers, num_kv_heads=layers, d_model=d_model,
                           d_ff=-(-8 * d_model // 3 // multiple) * multiple,
                           block_size=2 * layers // 8 if shape in PAPER else 2))
  config.data.update(dict(seq_len=context, global_batch_size=batch))
  config.optim.update(dict(peak_lr=peak_lr, warmup_steps=max(10, steps // 20)))
  config.train.update(dict(num_steps=steps, eval_every=steps, checkpoint_every=max(50, steps // 4),
                           dynamics_every=0))
  if moe:
    active_experts = MOE["top_k"] + MOE["num_shared_experts"]
    config.model.moe.update(dict(MOE, dense_d_ff=config.model.d_ff))
    config.model.update(dict(ffn="moe", d_ff=-(-config.model.d_ff // active_experts // 128) * 128))
  if shape in PAPER:
    config.model.update(dict(dtype="bfloat16", vocab_size=163_840, head_dim=128, attention_impl="auto",
                             depth_scan_segments=4))  # AttnRes reads ~2/3 of the buffer (docs/method.md §7)
    config.train.loss_chunk_size = 1024  # never the whole [B, 8192, 163840] float32 logits (docs/method.md §13)
    config.data.source = "token_files"  # the paper's tokenizer and corpus are the user's own
  return config
