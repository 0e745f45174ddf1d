"""Benchmarks: per-op microbenchmarks (bench/ops), model throughput, the GPU report. Not installed."""
