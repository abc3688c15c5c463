"""Benchmarks: measured on the GPU machine, results committed under benchmarks/results/."""
