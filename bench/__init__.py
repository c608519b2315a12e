"""Benchmarks: commands that print figures, run side by side with the peer they compare with, and record them
in BENCHMARKS.md (one section per benchmark, see ``bench.report``)."""
