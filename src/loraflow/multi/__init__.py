"""Many adapters in one batch: per-row slot ids, the ops, and the Triton kernels."""
