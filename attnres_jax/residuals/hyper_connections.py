"""mHC: multi-stream hyper-connections with doubly stochastic residual mixing (docs/method.md §8, §12.9).

Table 4's strongest prior baseline. The residual stream is widened to `m`
streams `x [m, B, T, d]` (the embedding copied into each). Before each
sublayer, per token, from `x~ = RMSNorm(x flattened to m d)`:
  H_pre  = sigmoid(a_pre x~ phi_pre + b_pre)         [m]     what the sublayer reads,
  H_post = 2 sigmoid(a_post x~ phi_post + b_post)    [m]     where its output is written,
  H_res  = P(a_res x~ phi_res + b_res)                [m, m]  doubly stochastic stream mixing,
  h = sum_j H_pre_j x_j,    x <- H_res x + H_post (x) f(h).
`P` is Sinkhorn-Knopp (`residual_mixing="sinkhorn"`, in log space, ending on
a column normalisation) or mHC-lite's exact parametrisation, a convex
combination of the `m!` permutation matrices (`"permutations"`). The model's
output is the mean of the streams.

Init: gates `a = 0.01`, `phi ~ N(0, init_std)`, and biases (`initial_bias`)
giving `H_post = 1`, the uniform `H_res`, and read weights `H_pre` summing to 1
that favour stream `l mod m` (HC's layer-cycling init): on identical streams
that is exactly PreNorm, and stays so while the gates are 0, yet every stream
gets its own gradient from the first step.
"""

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnres_jax.kernels.depth_attention_reference import compute_dtype, inverse_rms

Array = jax.Array
RESIDUAL_MIXINGS = ("sinkhorn", "permutations")
INITIAL_GATE = 0.01


class StreamMixing(NamedTuple):
  """Static layout of the hyper-connections: `m` streams and how `H_res` is made doubly stochastic."""

  streams: int
  residual_mixing: str = "sinkhorn"
  sinkhorn_iters: int = 20

  @property
  def residual_width(self) -> int:
    """Coefficients behind `H_res`: `m * m` logits (Sinkhorn) or `m!` permutation logits (mHC-lite)."""
    return self.streams**2 if self.residual_mixing == "sinkhorn" else math.factorial(self.streams)

  @property
  def width(self) -> int:
    return 2 * self.streams + self.residual_width


class HyperParams(NamedTuple):
  """One sublayer's hyper-connection parameters (or stacked `[L_b, K, ...]`)."""

  projection: Array  # phi [m d, 2m + R]: (pre, post, res) coefficients from the normalised streams
  gates: Array  # (a_pre, a_post, a_res) [3]
  bias: Array  # (b_pre, b_post, b_res) [2m + R]


def initial_bias(mixing: StreamMixing, num_sublayers: int) -> np.ndarray:
  """`b [L, 2m + R]` (module docstring): sublayer `l` reads `(m + 1) / 2m` of stream `l mod m`, `1 / 2m` of others."""
  m = mixing.streams
  favoured_LxM = np.arange(m)[None] == (np.arange(num_sublayers) % m)[:, None]
  read_LxM = np.where(favoured_LxM, (m + 1) / (2 * m), 1 / (2 * m))
  pre_LxM = np.log(read_LxM / (1 - read_LxM))  # sigmoid^-1
  return np.concatenate([pre_LxM, np.zeros((num_sublayers, m + mixing.residual_width))], axis=1)


def sinkhorn(logits_MxM: Array, iters: int) -> Array:
  """Sinkhorn-Knopp in log space: `exp(logits)` scaled to a doubly stochastic matrix (last two axes)."""
  def normalise(_, log_p):
    log_p = log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)
    return log_p - jax.nn.logsumexp(log_p, axis=-2, keepdims=True)

  return jnp.exp(jax.lax.fori_loop(0, iters, normalise, logits_MxM))


def permutation_matrices(streams: int) -> np.ndarray:
  """`[m!, m, m]` one-hot permutation matrices (the Birkhoff polytope's vertices)."""
  return np.eye(streams, dtype=np.float32)[np.array(list(itertools.permutations(range(streams))))]


def residual_matrix(logits: Array, mixing: StreamMixing) -> Array:
  """`H_res [..., m, m]` from its `R` coefficients: Sinkhorn, or the permutations' convex combination."""
  m = mixing.streams
  if mixing.residual_mixing == "sinkhorn":
    return sinkhorn(logits.reshape(logits.shape[:-1] + (m, m)), mixing.sinkhorn_iters)
  return jnp.einsum("...p,pij->...ij", jax.nn.softmax(logits, axis=-1),
                    permutation_matrices(m).astype(logits.dtype))


class Coefficients(NamedTuple):
  pre_BxTxM: Array
  post_BxTxM: Array
  res_BxTxMxM: Array


def coefficients(hyper: HyperParams, x_MxBxTxD: Array, mixing: StreamMixing, eps: float) -> Coefficients:
  """`H_pre`, `H_post`, `H_res` of every token from its streams (module docstring)."""
  m = mixing.streams
  dtype = compute_dtype(x_MxBxTxD.dtype)
  flat_BxTxF = jnp.moveaxis(x_MxBxTxD, 0, -2).reshape(x_MxBxTxD.shape[1:3] + (-1,))
  normed_BxTxF = flat_BxTxF.astype(dtype) * inverse_rms(flat_BxTxF, eps)[..., None]
  raw_BxTxC = jnp.einsum("btf,fc->btc", normed_BxTxF, hyper.projection.astype(dtype),
                         precision=jax.lax.Precision.HIGHEST)
  gates = jnp.concatenate([jnp.repeat(hyper.gates[:2], m), jnp.repeat(hyper.gates[2:], mixing.residual_width)])
  raw_BxTxC = gates.astype(dtype) * raw_BxTxC + hyper.bias.astype(dtype)
  pre, post, res = raw_BxTxC[..., :m], raw_BxTxC[..., m:2 * m], raw_BxTxC[..., 2 * m:]
  return Coefficients(jax.nn.sigmoid(pre), 2 * jax.nn.sigmoid(post), residual_matrix(res, mixing))


def read(coefficients: Coefficients, x_MxBxTxD: Array) -> Array:
  """The sublayer input `h = sum_j H_pre_j x_j`."""
  return jnp.einsum("btm,mbtd->btd", coefficients.pre_BxTxM.astype(x_MxBxTxD.dtype), x_MxBxTxD)


def write(coefficients: Coefficients, x_MxBxTxD: Array, out_BxTxD: Array) -> Array:
  """`x <- H_res x + H_post (x) out`."""
  dtype = x_MxBxTxD.dtype
  mixed = jnp.einsum("btij,jbtd->ibtd", coefficients.res_BxTxMxM.astype(dtype), x_MxBxTxD)
  return mixed + jnp.einsum("btm,btd->mbtd", coefficients.post_BxTxM.astype(dtype), out_BxTxD)
