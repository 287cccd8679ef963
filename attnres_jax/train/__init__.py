"""Losses, and (later) the training loop."""
