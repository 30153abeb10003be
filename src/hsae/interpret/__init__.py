"""Interpretation: post-hoc feature forests, the examples pass (top contexts, quantiles, histograms,
co-firing), labels (offline and through an LLM), interpretability scores, steering, and concepts of
image features. docs/architecture.md has a line per module."""
