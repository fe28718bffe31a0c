"""fastopt benchmarks (installed as fastopt.benchmarks)."""
