"""Experiments: wrong-answer detection and test-time scaling on real models."""
