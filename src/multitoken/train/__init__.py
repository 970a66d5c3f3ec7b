"""Training: the n-token loss with the per-head backward (loss), packed token data (data), the
training loop with crash-safe checkpoints (trainer)."""

from multitoken.train.loss import HeadStats, NTokenLoss, evaluate_batch, forward_backward, ntoken_loss

__all__ = ["HeadStats", "NTokenLoss", "evaluate_batch", "forward_backward", "ntoken_loss"]
