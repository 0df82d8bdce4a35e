"""The `gradmon` command line and what only it uses: demo, local stack, benchmarks."""
