"""The paper's depth-mixing rules as pure functions, and the PreNorm baseline."""

from attnres_jax.residuals.depth_attention import depth_attention
from attnres_jax.residuals.depth_loop import DepthState, attnres_loop, output_mix
from attnres_jax.residuals.prenorm import prenorm_loop
from attnres_jax.residuals.schedule import BlockSchedule
