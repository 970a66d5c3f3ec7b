"""multitoken: multi-token prediction language models (Gloeckle et al. 2024)."""

from multitoken.checkpoint import CheckpointError, load_model, save_model
from multitoken.generation import Llama
from multitoken.model import ModelArgs, Transformer

__all__ = ["CheckpointError", "Llama", "ModelArgs", "Transformer", "load_model", "save_model"]
__version__ = "0.1.0"
