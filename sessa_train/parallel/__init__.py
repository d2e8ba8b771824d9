"""Model parallelism with megatron-core (tensor parallelism so far; docs/parallelism.md)."""
