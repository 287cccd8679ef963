"""Causal self-attention without a KV cache, by `config.model.attention_impl`.

- `xla`: `jax.nn.dot_product_attention` in XLA; it builds the dense `[T, T]`
  scores of every head (training memory grows as T^2).
- `splash` / `splash_interpret`: the Pallas TPU flash kernel of
  `jax.experimental.pallas.ops.tpu.splash_attention` (compiled by Mosaic, or
  interpreted on CPU); scores live in VMEM one block at a time. Grouped KV
  heads are passed as they are (the kernel maps query head n to KV head
  n // (N / K)); nothing is repeated. T must be a multiple of 128.
- `cudnn`: cuDNN's fused attention through `jax.nn.dot_product_attention`
  (NVIDIA GPUs, float16 / bfloat16). With segment ids, jax hands cuDNN the
  mask as a dense additive bias `[B, 1, T, T]` (and computes its unused
  gradient), so that case holds T^2 values per example, once for all heads.
- `auto`: splash on TPU (xla where T is not a multiple of 128), cudnn on GPU
  (xla for float32 and float64), xla elsewhere; by the platform being compiled
  for, which is the active mesh's (an ahead-of-time TPU compile on a CPU host)
  or else `jax.default_backend()`.

Segment ids (document masking, docs/method.md §14) restrict attention further:
position t attends to s <= t only where `segment_ids_BxT[s] == segment_ids_BxT[t]`;
xla and cudnn get a boolean mask, splash the kernel's `SegmentIds`.

A Mosaic kernel cannot be partitioned by GSPMD, so inside `sharding.activate`
the splash call runs in `jax.shard_map`, each device on its own batch rows (and
their segment ids) and, where the rules shard `activation_heads` and the mesh
axes divide both the query and the KV heads, its own heads; the sequence is
never split.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from attnres_jax import axes, sharding

Array = jax.Array
IMPLS = ("xla", "splash", "splash_interpret", "cudnn", "auto")
SPLASH_BLOCKS = (512, 256, 128)  # splash tile sizes tried, largest first; the first dividing T is used
# Per-device layout of q, k, v for the kernel: the sequence stays whole.
_SHARD_NAMES = (axes.BATCH, None, axes.ACTIVATION_HEADS, None)


def causal_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, *, impl: str,
                     segment_ids_BxT: Array | None = None) -> Array:
  """softmax(q k^T / sqrt(H) + causal mask) v, in the dtype of q; K divides N (grouped-query attention).

  With `segment_ids_BxT` (integers), the mask also keeps each position inside its own segment.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = auto_impl(q_BxTxNxH.shape[1], q_BxTxNxH.dtype)
  if impl in ("xla", "cudnn"):
    mask_Bx1xTxT = None if segment_ids_BxT is None else same_segment_mask(segment_ids_BxT)
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT, is_causal=True,
                                        implementation=impl)
  return splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=segment_ids_BxT,
                          interpret=impl == "splash_interpret")


def same_segment_mask(segment_ids_BxT: Array) -> Array:
  """Boolean `[B, 1, T, T]`: whether query position t and key position s share a segment (for every head)."""
  return (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]


def target_platform() -> str:
  """The platform being compiled for: the active mesh's devices', else the default backend."""
  mesh = sharding.active_mesh()
  return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def auto_impl(seq_len: int, dtype) -> str:
  """The implementation `auto` stands for, for sequences of `seq_len` in `dtype` on `target_platform()`."""
  platform = target_platform()
  if platform == "tpu" and seq_len % SPLASH_BLOCKS[-1] == 0:
    return "splash"
  if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def splash_attention(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, *, interpret: bool,
                     segment_ids_BxT: Array | None = None) -> Array:
  """The splash kernel, per device in a `shard_map` when a mesh is active (see the module docstring)."""
  seq_len = q_BxTxNxH.shape[1]
  if seq_len % SPLASH_BLOCKS[-1]:
    raise ValueError(f"attention_impl=splash needs a sequence length that is a multiple of {SPLASH_BLOCKS[-1]} "
                     f"(its tile), got {seq_len}: use auto (xla for such lengths) or xla")
  local = functools.partial(_splash_local, interpret=interpret)
  segments = () if segment_ids_BxT is None else (segment_ids_BxT.astype(jnp.int32),)
  mesh = sharding.active_mesh()
  if mesh is None or mesh.size == 1:
    return local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *segments)
  q_spec, kv_spec = _shard_specs(q_BxTxNxH.shape, k_BxTxKxH.shape)
  segment_specs = (PartitionSpec(q_spec[0], None),) * len(segments)  # the rows of q, the whole sequence
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + segment_specs, out_specs=q_spec,
                       check_vma=False)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *segments)


def _splash_local(q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, segment_ids_BxT: Array | None = None, *,
                  interpret: bool) -> Array:
  """The kernel on whole arrays: `[heads, T, H]` per example, vmapped over the batch; q pre-scaled."""
  _, seq_len, num_heads, head_dim = q_BxTxNxH.shape
  block = next(b for b in SPLASH_BLOCKS if seq_len % b == 0)
  kernel = splash_kernel.make_splash_mha(
      splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len))] * num_heads),
      block_sizes=splash_kernel.BlockSizes(
          block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
          block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
      head_shards=1, q_seq_shards=1, interpret=interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  scaled_q = (q_BxTxNxH.astype(jnp.float32) * head_dim**-0.5).astype(q_BxTxNxH.dtype)
  segment_ids = None if segment_ids_BxT is None else splash_kernel.SegmentIds(q=segment_ids_BxT, kv=segment_ids_BxT)
  o_BxNxTxH = jax.vmap(kernel)(heads_first(scaled_q), heads_first(k_BxTxKxH), heads_first(v_BxTxKxH), segment_ids)
  return heads_first(o_BxNxTxH)


def _shard_specs(q_shape: tuple[int, ...], kv_shape: tuple[int, ...]) -> tuple[PartitionSpec, PartitionSpec]:
  """shard_map specs of q and of k, v under the active rules; heads are split only where both splits agree."""
  specs = [sharding.activation_spec(_SHARD_NAMES, shape) for shape in (q_shape, kv_shape)]
  if specs[0][2] != specs[1][2]:
    specs = [PartitionSpec(spec[0], None, None, None) for spec in specs]
  return specs[0], specs[1]
