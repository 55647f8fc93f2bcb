"""Logits processors: the batched, stateful seam between the model's logits and the draw (see base.py)."""
