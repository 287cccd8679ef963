"""The scanned transformer (`transformer.py`) and its building blocks."""
