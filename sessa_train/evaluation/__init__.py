"""Evaluation: synthetic long-context tasks, accuracy/perplexity evaluation, memory-tail diagnostic."""
