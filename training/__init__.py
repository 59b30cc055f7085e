"""Training: the accelerate script, the built-in digits data, evaluation, the demo (see README.md)."""
