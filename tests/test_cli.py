"""Command-line tools report a user's mistake as one line `error: ...` and a non-zero exit, a bug with its
traceback; `ATTNRES_TRACEBACK=1` shows the traceback of either."""

import os
import subprocess
import sys

import pytest

from attnres_jax import cli
from helpers import REPO, run_main

SHORT = {name: value for name, value in os.environ.items() if name != cli.TRACEBACK_VARIABLE}  # the default
MAIN_MISTAKES = {  # overrides of the smoke config -> exit code, text of the error line
    "misspelt_override": (["--config.model.block_siz=0"], 2, 'Did you mean "block_size"'),
    "missing_config_file": (["--config=configs/nonexistent.py", "--config.model.block_size=2"], 2,
                            "configs/nonexistent.py: no such file"),
    "bad_value": (["--config.model.block_size=0"], 1, "config.model.block_size=0: must be"),
    "missing_data": (["--config.data.source=token_files", "--config.data.path=/nonexistent"], 1,
                     "config.data.path='/nonexistent': no such directory"),
}


def assert_one_error_line(code: int, output: str, expected_code: int, text: str) -> None:
  errors = [line for line in output.splitlines() if line.startswith("error: ")]
  assert code == expected_code and len(errors) == 1 and "Traceback" not in output, output
  assert text in output, output


@pytest.mark.parametrize("name", MAIN_MISTAKES)
def test_main_reports_a_mistake_in_one_line(tmp_path, name):
  overrides, expected_code, text = MAIN_MISTAKES[name]
  assert_one_error_line(*run_main(tmp_path / "workdir", *overrides, env=SHORT), expected_code, text)


@pytest.mark.parametrize("module,arguments,text", [
    ("attnres_jax.data.prepare_data", ["--input_dir=/nonexistent", "--output_dir=/tmp/unused"],
     "--input_dir='/nonexistent': no such directory"),
    ("experiments.sweep", ["--sweep=/nonexistent.py", "--workdir=/tmp/unused"], "no such file /nonexistent.py"),
])
def test_tools_report_a_mistake_in_one_line(module, arguments, text):
  process = subprocess.run([sys.executable, "-m", module, *arguments], cwd=REPO, capture_output=True, text=True,
                           env=SHORT, timeout=300)
  assert_one_error_line(process.returncode, process.stdout + process.stderr, 1, text)


def test_traceback_on_request(tmp_path):
  code, output = run_main(tmp_path / "workdir", "--config.model.block_size=0",
                          env={**SHORT, cli.TRACEBACK_VARIABLE: "1"})
  assert code == 1 and "Traceback (most recent call last)" in output, output
  assert "ValueError: config.model.block_size=0" in output and "\nerror: " not in output, output


def raising(error: BaseException):
  """An argparse tool's `main` that raises `error`."""
  def main() -> None:
    raise error
  return main


def test_only_user_mistakes_are_shortened(capsys, monkeypatch):
  monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.run_argparse(raising(ValueError("first line\nsecond line")))
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == "error: first line\n  second line\n"
  with pytest.raises(SystemExit) as exit_info:  # Ctrl-C: no traceback
    cli.run_argparse(raising(KeyboardInterrupt()))
  assert exit_info.value.code == 130 and capsys.readouterr().err == "error: KeyboardInterrupt\n"
  for bug in (RuntimeError("a bug"), KeyError("a lookup outside flag parsing")):
    with pytest.raises(type(bug)):
      cli.run_argparse(raising(bug))
  monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
  with pytest.raises(ValueError):
    cli.run_argparse(raising(ValueError("shown with its traceback")))
