"""Serving: a compact Llama with a paged KV cache, continuous batching, per-request adapters."""
