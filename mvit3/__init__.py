"""mvit3: MobileViT v1/v2/v3 in PyTorch, exact to the official models, with fused kernels."""

from .checkpoint import load_checkpoint
from .models import create_model, list_models
from .preprocess import preprocess
from .dense_eval import detect, segment
from .stats import model_stats

__version__ = "0.1.0"

__all__ = ["create_model", "detect", "list_models", "load_checkpoint", "model_stats", "preprocess",
           "segment"]
