"""Benchmarks: every speed claim of balloon-hints, measured as ratios in one run.

Run one with ``.venv/bin/python -m bench.<name>`` (or ``bench/<name>.py``); figures and
the commands that produced them are recorded in docs/PERFORMANCE.md.
"""
