"""Depth attention over a set of sources: jnp reference, Pallas kernel, and the op choosing between them."""
