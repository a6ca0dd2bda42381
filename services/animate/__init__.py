"""Animate: portraits checked and prepared once, then made to speak."""
