"""Evaluation: classification metrics, perplexity, and code generation scored in a sandbox."""
