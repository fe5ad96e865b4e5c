"""Flax Linen modules, one file per JanusFlow component."""
