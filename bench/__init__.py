# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmarks of passt-repair: the helper against a C reference and the in-process floor.

Run everything with `.venv/bin/python -m bench` (see bench/run.py and docs/performance.md).
Nothing here is a test: the figures are printed and saved, never asserted.
"""
