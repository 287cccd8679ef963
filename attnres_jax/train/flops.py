"""Training FLOPs per token (matmuls, attention, depth mixing), device peaks for MFU, and device memory."""

import jax
import ml_collections

from attnres_jax.model.moe import active_params_per_token, spec_from_config
from attnres_jax.model.transformer import dense_ffn_width
from attnres_jax.residuals.hyper_connections import StreamMixing
from attnres_jax.residuals.schedule import BlockSchedule

# Dense matmul peak FLOP/s per device by compute dtype, by a substring of `device_kind` (vendor data
# sheets, without sparsity). float32 matmuls at JAX's default precision run on the GPU's TF32 tensor cores
# and on the TPU's MXU in bfloat16 passes, so their peaks are TF32's and bfloat16's.
_TPU_BF16 = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
             "TPU v6": 918e12}
PEAK_FLOPS = {
    "bfloat16": {**_TPU_BF16, "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12},
    "float32": {**_TPU_BF16, "H200": 495e12, "H100": 495e12, "A100": 156e12, "L40S": 183e12, "L4": 60e12},
}

# HBM bytes per chip by `device_kind` (v5p: what the TPU compiler reports; others: data sheets).
HBM_BYTES = {"TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30, "TPU v5e": 16 * 2**30, "TPU v5p": 95.74e9,
             "TPU v5": 95.74e9, "TPU v6 lite": 32 * 2**30, "H200": 141e9, "H100": 80 * 2**30, "A100": 80 * 2**30}


def forward_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> dict[str, float]:
  """Multiply-adds x 2 of one token's forward pass, split by kind.

  matmul: projections, MLP (MoE: the router and the experts a token is sent to, by active parameters)
  and LM head; attention: scores and values over the
  causal context (average seq_len / 2 keys); depth: AttnRes logits and sums
  (2 x 2d per visible source per sublayer, plus the output query; and the
  input-dependent query's d x d projection), or mHC's stream coefficients and mixing.
  """
  d, head_dim = model.d_model, model.head_dim or model.d_model // model.num_heads
  attention_params = d * head_dim * (2 * model.num_heads + 2 * model.num_kv_heads)
  dense_ffn_params = 3 * d * dense_ffn_width(model)
  num_moe = model.num_layers - model.moe.dense_layers if model.ffn == "moe" else 0
  ffn_params = ((model.num_layers - num_moe) * dense_ffn_params
                + num_moe * active_params_per_token(d, spec_from_config(model)))
  matmul = 2 * (model.num_layers * attention_params + ffn_params + d * model.vocab_size)
  attention = 2 * 2 * model.num_layers * model.num_heads * head_dim * seq_len / 2
  depth, num_sublayers = 0.0, 2 * model.num_layers
  if model.residual in ("full", "block"):
    schedule = BlockSchedule(model.num_layers, 2, model.block_size if model.residual == "block" else 1)
    visible = (schedule.slot() + 1 + ~schedule.starts_block()).sum() + schedule.num_slots + 1
    per_source = 2.0 * d if model.depth_logits == "learned" else 4.0 * d  # learned logits: no key dot product
    depth = per_source * float(visible) + (2.0 * d * d * num_sublayers if model.depth_query_projection else 0.0)
  elif model.residual == "mhc":
    m = model.mhc_streams
    mixing = StreamMixing(m, model.mhc_residual_mixing)
    # coefficients from the m d streams, then read (m d), mix streams (m^2 d) and write (m d)
    depth = 2.0 * num_sublayers * m * d * (mixing.width + m + 2)
  return {"matmul": float(matmul), "attention": float(attention), "depth": depth,
          "total": float(matmul + attention + depth)}


def train_flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> float:
  """Forward + backward (3x forward); rematerialisation is not counted (model FLOPs)."""
  return 3.0 * forward_flops_per_token(model, seq_len)["total"]


def peak_flops_per_device(device: jax.Device, dtype: str) -> float | None:
  """The device's dense matmul peak for compute `dtype`, or None where it is not known (CPUs, float64)."""
  return _by_device_kind(PEAK_FLOPS.get(dtype, {}), device)


def hbm_bytes_per_device(device: jax.Device) -> float | None:
  """The device's HBM in bytes, or None where it is not known."""
  return _by_device_kind(HBM_BYTES, device)


def _by_device_kind(table: dict[str, float], device: jax.Device) -> float | None:
  """The entry of the longest key that is a substring of `device.device_kind`."""
  matches = [kind for kind in table if kind in device.device_kind]
  return table[max(matches, key=len)] if matches else None
