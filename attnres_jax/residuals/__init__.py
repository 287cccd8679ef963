"""The paper's depth-mixing rules as pure functions, and the residual-stream baselines (PreNorm, mHC)."""

from attnres_jax.residuals.depth_attention import depth_attention
from attnres_jax.residuals.depth_loop import LoopSpec, attnres_loop
from attnres_jax.residuals.depth_mixing import DepthState, Mixing, output_mix
from attnres_jax.residuals.residual_stream import stream_loop
from attnres_jax.residuals.schedule import BlockSchedule
from attnres_jax.residuals.types import LayerGroup, LoopOutput, SublayerOutput

__all__ = ["BlockSchedule", "DepthState", "LayerGroup", "LoopOutput", "LoopSpec", "Mixing", "SublayerOutput",
           "attnres_loop", "depth_attention", "output_mix", "stream_loop"]
