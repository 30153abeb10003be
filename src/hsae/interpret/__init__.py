"""Interpretation tools: post-hoc feature forests (forest.py), and later top examples, labels, steering."""
