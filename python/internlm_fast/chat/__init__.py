"""`python -m internlm_fast.chat`: chat with a model in the terminal (streaming, history, /clear, /exit)."""

from .cli import main
from .loading import default_model_dir, load_model

__all__ = ["default_model_dir", "load_model", "main"]
