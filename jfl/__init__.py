"""jfl: JanusFlow in JAX/Flax."""
