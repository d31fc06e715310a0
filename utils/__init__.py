"""Utilities shared by the training, evaluation and test code."""
