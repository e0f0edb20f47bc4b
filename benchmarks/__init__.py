"""Benchmarks of timm-scheme's kernels and models: `python -m benchmarks.run [--quick]`."""
