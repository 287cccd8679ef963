"""Small files written so that a kill never leaves them half-written."""

import json
import os
from typing import Any


def write_json_atomically(path: str, value: Any) -> None:
  """Writes `value` as JSON to a temporary file beside `path`, flushed to disk, then renames it into place."""
  temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(temporary, "w", encoding="utf-8") as file:
      json.dump(value, file, indent=2)
      file.write("\n")
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):  # the write or the rename failed
      os.remove(temporary)
