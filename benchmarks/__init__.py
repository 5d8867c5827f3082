"""Load generator and micro-benchmarks. Results go to benchmarks/RESULTS.md."""
