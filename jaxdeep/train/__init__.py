"""Training: state and shardings, jitted steps, the run loop, checkpoints and metrics."""
