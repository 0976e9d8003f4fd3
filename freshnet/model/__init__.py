"""Training, predicting, evaluating, and the promotion policy."""
