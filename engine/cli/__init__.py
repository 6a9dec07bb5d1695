"""The headless command line `zopro` (app), and what its commands run: training with a live progress
line (runner), comparisons (compare) and benchmarks (bench)."""
