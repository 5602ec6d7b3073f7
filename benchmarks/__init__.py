"""Scripts that measure edgec at model size; each runs as `python -m benchmarks.NAME` from the repository root."""
