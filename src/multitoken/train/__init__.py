"""Training: the n-token loss with the per-head backward (loss), packed token data (data), the
training loop with crash-safe checkpoints (trainer)."""

from multitoken.train.loss import HeadStats, evaluate_batch, forward_backward

__all__ = ["HeadStats", "evaluate_batch", "forward_backward"]
