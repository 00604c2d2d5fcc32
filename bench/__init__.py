"""Benchmarks: each prints ratios measured side by side and records them in bench/RESULTS.md."""
