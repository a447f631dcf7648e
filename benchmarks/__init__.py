"""Speed benchmarks (DESIGN.md section 8). Run on a GPU: `make bench` or `python -m benchmarks.<name>`."""
