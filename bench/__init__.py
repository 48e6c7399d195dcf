"""Side-by-side benchmarks: serving, compression and the platform (see bench/README.md)."""
