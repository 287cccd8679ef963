"""Training dynamics (docs/method.md §10): the logged statistics are the model's, the logger runs inside training,
and the plot script draws every figure."""

import os

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import optax
import pytest
from flax import nnx

from attnres_jax.residuals.mixing_rules import ContentLogits
from attnres_jax.train.dynamics import make_dynamics_step, read_dynamics
from attnres_jax.train.loss import next_token_loss
from attnres_jax.train.metrics import open_jsonl
from experiments import plot_dynamics
from helpers import make_model, random_tokens, run_main


def test_dynamics_step_reports_the_models_statistics_and_per_sublayer_gradient_norms():
  model, tokens = make_model("block", block_size=3), random_tokens(batch=4, length=9)
  graphdef, params = nnx.split(model)
  dynamics = make_dynamics_step(graphdef, grad_accum_steps=2)(params, tokens)
  first_micro_batch = tokens[::2]
  _, stats = model(first_micro_batch[:, :-1], return_stats=True)
  for name in ("input_rms", "output_rms", "depth_weights", "output_depth_weights"):
    np.testing.assert_allclose(dynamics[name], stats[name], rtol=1e-5, err_msg=name)
  grads = nnx.jit(nnx.grad(next_token_loss))(model, first_micro_batch)
  np.testing.assert_allclose(dynamics["loss"], next_token_loss(model, first_micro_batch), rtol=1e-6)
  layers = grads["layers"]
  for layer in range(model.num_layers):
    for k, modules in enumerate((("attention_norm", "attention"), ("mlp_norm", "mlp"))):
      want = optax.tree.norm(jax.tree.map(lambda g: g[layer], [layers[name] for name in modules]))
      np.testing.assert_allclose(dynamics["grad_norm"][2 * layer + k], want, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(dynamics["grad_norm"] ** 2), optax.tree.norm(layers) ** 2, rtol=1e-5)


def test_open_jsonl_drops_a_partial_last_line(tmp_path):
  path = str(tmp_path / "log.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1}\n{"step": 2, "loss": [0.')  # killed mid-write
  with open_jsonl(path) as f:
    f.write('{"step": 2}\n')
  assert open(path).read() == '{"step": 1}\n{"step": 2}\n'


def test_training_logs_dynamics_and_the_plot_script_draws_them(tmp_path):
  workdirs = {residual: str(tmp_path / residual) for residual in ("prenorm", "block")}
  for residual, workdir in workdirs.items():
    code, output = run_main(workdir, f"--config.model.residual={residual}", "--config.train.dynamics_every=4")
    assert code == 0, output
    records = read_dynamics(workdir)
    assert [r["step"] for r in records] == [4, 8, 12]
    for record in records:  # smoke model: 2 layers = 4 sublayers
      for name in ("input_rms", "output_rms", "grad_norm"):
        assert record[name].shape == (4,) and np.all(np.isfinite(record[name])) and np.all(record[name] > 0)
    assert ("depth_weights" in records[-1]) == (residual == "block")
  np.testing.assert_allclose(records[-1]["depth_weights"].sum(-1), 1.0, rtol=1e-5)  # block, S = 2: [4, 3]
  assert records[-1]["depth_weights"].shape == (4, 3)

  out = str(tmp_path / "plots")
  paths = plot_dynamics.plot_runs([workdirs["prenorm"], workdirs["block"]], out)
  assert sorted(os.path.basename(p) for p in paths) == [
      "depth_weights_block.png", "grad_norm_vs_depth.png", "magnitude_vs_depth.png"]
  for path in paths:
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert np.ptp(image[..., :3]) > 0.5  # something was drawn, not a blank canvas


def test_plotted_runs_are_named_by_the_path_parts_that_tell_them_apart():
  assert plot_dynamics.run_names(["w/prenorm", "w/block"]) == ["prenorm", "block"]
  assert plot_dynamics.run_names(["s/full/seed0", "s/block/seed0", "t/block/seed1"]) == [
      "full_seed0", "block_seed0", "block_seed1"]
  assert plot_dynamics.run_names(["/a/x/seed0", "/b/x/seed0"]) == ["a_x_seed0", "b_x_seed0"]
  with pytest.raises(ValueError, match="twice"):
    plot_dynamics.run_names(["w/full", "w/full/"])


def test_beyond_window_share_is_the_weight_the_models_own_window_hides():
  """`plot_dynamics --window_share` sums the weights the rule's window (`MixingRule.visible`) would hide."""
  num_sublayers, window = 7, 3
  rows = np.random.default_rng(0).dirichlet(np.ones(num_sublayers + 1), size=num_sublayers + 1)
  rows = np.tril(rows)  # mixture t (the output: t = 7) sees the embedding and the outputs 1 .. t
  run = {"name": "full", "model": {"residual": "full"},
         "record": {"depth_weights": rows[:-1], "output_depth_weights": rows[-1]}}
  share = plot_dynamics.beyond_window_share(run, window)
  for t, weights in enumerate(rows):  # as if every source were a sealed slot (the window counts ages alike)
    hidden = (np.asarray(ContentLogits().visible(num_sublayers + 1, t + 1, False))
              & ~np.asarray(ContentLogits(window=window).visible(num_sublayers + 1, t + 1, False)))[:-1]
    np.testing.assert_allclose(share[t], weights[hidden].sum(), rtol=1e-12)
  assert share[window] == 0 and share[-1] > 0
  with pytest.raises(ValueError, match="Full AttnRes"):
    plot_dynamics.beyond_window_share({**run, "model": {"residual": "block"}}, window)
