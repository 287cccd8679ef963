"""The repository documents itself: no file cites notes a user who clones it lacks, and every
`docs/method.md §N` citation names a section that exists in docs/method.md."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"

# Built from pieces so that this file does not match itself.
FORBIDDEN = ("shared" + "/design", "attnres" + "-spec", "stack" + "-notes", "../" + "shared")

# `docs/method.md §4`, `docs/method.md §2, §6`, `docs/method.md §3-§5`, `docs/method.md §12.2`.
CITATION = re.compile(r"docs/method\.md`?((?:\s*(?:,|and|-|–)?\s*§\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s+\S", re.MULTILINE)


def tracked_files() -> list[pathlib.Path]:
  try:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    names = [name for name in out.decode().split("\0") if name]
  except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
    skip = lambda p: any(part == ".git" or part.startswith(".venv") or part == "__pycache__" for part in p.parts)
    names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and not skip(p.relative_to(ROOT))]
  files = [ROOT / name for name in names]
  if METHOD not in files and METHOD.exists():  # a new, not yet tracked document counts too
    files.append(METHOD)
  return [f for f in files if f.is_file()]


def text_of(path: pathlib.Path) -> str | None:
  data = path.read_bytes()
  if b"\0" in data:  # binary (images)
    return None
  return data.decode("utf-8", errors="replace")


def texts() -> dict[str, str]:
  out = {}
  for path in tracked_files():
    text = text_of(path)
    if text is not None:
      out[str(path.relative_to(ROOT))] = text
  return out


def method_sections() -> set[str]:
  return set(HEADING.findall(METHOD.read_text()))


def test_no_file_cites_notes_outside_the_repository():
  hits = [f"{name}:{i}: {line.strip()}"
          for name, text in texts().items()
          for i, line in enumerate(text.splitlines(), 1)
          if any(s in line for s in FORBIDDEN)]
  assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_method_document_has_numbered_sections():
  assert METHOD.exists(), "docs/method.md is missing"
  sections = method_sections()
  assert {str(n) for n in range(1, 10)} <= sections, sorted(sections)


def test_every_method_citation_names_an_existing_section():
  assert METHOD.exists(), "docs/method.md is missing"
  sections = method_sections()
  cited, bad = 0, []
  for name, text in texts().items():
    for i, line in enumerate(text.splitlines(), 1):
      # In the document itself a bare `§N` is a cross-reference to its own sections.
      tails = [line] if name == "docs/method.md" else [m.group(1) for m in CITATION.finditer(line)]
      for tail in tails:
        for number in SECTION.findall(tail):
          cited += 1
          if number not in sections:
            bad.append(f"{name}:{i}: §{number}")
  assert cited > 0
  assert not bad, f"citations of missing sections (have {sorted(sections)}):\n" + "\n".join(bad)


@pytest.mark.parametrize("line,numbers", [
    ("see docs/method.md §4.", ["4"]),
    ("(docs/method.md §2, §6)", ["2", "6"]),
    ("docs/method.md §3-§5", ["3", "5"]),
    ("docs/method.md §12.2 and §8", ["12.2", "8"]),
    ("see `docs/method.md` §11", ["11"]),
])
def test_citation_pattern(line, numbers):
  tails = [m.group(1) for m in CITATION.finditer(line)]
  assert [n for t in tails for n in SECTION.findall(t)] == numbers
