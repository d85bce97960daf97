"""Helper scripts and /proc utilities for the real-process test suites (see procs.py)."""
