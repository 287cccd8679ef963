"""The scaling-law fit recovers a known law and its compute multiplier (docs/method.md §9)."""

import numpy as np
import pytest

from experiments import fit_scaling


def test_fit_recovers_a_known_law_and_its_uncertainty_covers_the_truth():
  rng = np.random.default_rng(0)
  compute = np.geomspace(1e-3, 1e1, 8)
  noisy = 1.9 * compute**-0.057 * np.exp(rng.normal(0.0, 2e-3, compute.size))
  fit = fit_scaling.fit_power_law(compute, noisy)
  assert abs(fit.exponent - 0.057) < 3 * fit.exponent_stderr and fit.exponent_stderr < 0.01
  assert abs(np.log(fit.coefficient / 1.9)) < 3 * fit.log_coefficient_stderr
  exact = fit_scaling.fit_power_law(compute, 1.9 * compute**-0.057)
  np.testing.assert_allclose([exact.coefficient, exact.exponent], [1.9, 0.057], rtol=1e-10)
  assert exact.exponent_stderr < 1e-10


def test_compute_multiplier_of_the_papers_laws():
  """docs/method.md §9: Block 1.870 C^-0.058 vs baseline 1.891 C^-0.057 is about 1.25x at the paper's losses."""
  compute = np.geomspace(1e-1, 1e1, 5)
  baseline = fit_scaling.fit_power_law(compute, 1.891 * compute**-0.057)
  block = fit_scaling.fit_power_law(compute, 1.870 * compute**-0.058)
  target = 1.80
  multiplier = fit_scaling.compute_multiplier(block, baseline, target)
  want = (1.891 / target) ** (1 / 0.057) / (1.870 / target) ** (1 / 0.058)
  np.testing.assert_allclose(multiplier, want, rtol=1e-8)
  assert 1.1 < multiplier < 1.5
  assert fit_scaling.compute_multiplier(baseline, baseline, target) == pytest.approx(1.0)


def test_cli_prints_fits_and_draws_the_plot(tmp_path, capsys):
  path = tmp_path / "points.csv"
  rows = ["variant,compute,loss"] + [f"{v},{c},{a * c ** -e}" for v, a, e in (("prenorm", 2.0, 0.05),
                                                                              ("block", 1.95, 0.05))
                                     for c in (1.0, 2.0, 4.0, 8.0)]
  path.write_text("\n".join(rows) + "\n")
  fit_scaling.main([f"--csv={path}", f"--out={tmp_path / 'fit.png'}"])
  printed = capsys.readouterr().out
  assert "| block |" in printed and (tmp_path / "fit.png").stat().st_size > 10_000
  multiplier = (2.0 / 1.95) ** (1 / 0.05)
  assert f"{multiplier:.3f}" in printed
  with pytest.raises(ValueError, match="distinct compute"):
    fit_scaling.fit_power_law([1.0, 1.0, 2.0], [3.0, 3.0, 2.0])


def test_points_can_be_bits_per_byte(tmp_path):
  path = tmp_path / "results.csv"
  path.write_text("variant,compute,loss,bits_per_byte\nprenorm,1e15,2.0,0.9\nprenorm,1e16,1.5,0.7\nfull,1e15,1.9,\n")
  with pytest.raises(ValueError, match="results.csv:4: no bits_per_byte value"):
    fit_scaling.read_points(str(path), "bits_per_byte")
  path.write_text("variant,compute,loss,bits_per_byte\nprenorm,1e15,2.0,0.9\nprenorm,1e16,1.5,0.7\n")
  np.testing.assert_array_equal(fit_scaling.read_points(str(path), "bits_per_byte")["prenorm"][1], [0.9, 0.7])
  np.testing.assert_array_equal(fit_scaling.read_points(str(path))["prenorm"][1], [2.0, 1.5])
