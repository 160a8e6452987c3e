"""Benchmark suite of curvops: cost of curvature products in multiples of one gradient.

Run ``python -m benchmarks --help``; see ``benchmarks/README.md``.
"""
