"""Benchmarks that check the design's claims, each as a ratio of two things measured side by side.

    make bench                      # or: .venv/bin/python -m benchmarks [--quick] [--only embed,generation]

See BENCHMARKS.md for what each one measures, its goal and the latest results.
"""
