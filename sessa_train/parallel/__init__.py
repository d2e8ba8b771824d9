"""Tensor, pipeline and context parallelism applied to the one model definition (docs/parallelism.md)."""
