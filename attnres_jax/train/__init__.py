"""Training: loss, optimiser, pure steps, sharded state, checkpoints, metrics and the loop."""
