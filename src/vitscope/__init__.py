"""vitscope: a fast, faithful Vision Transformer for MNIST-sized images, and a window into what it learns."""
__version__ = "0.1.0"

from .config import PRESETS, RuntimeConfig, TrainConfig, ViTConfig
from .errors import VitscopeError
from .model import BlogViT, ViT, build_model
from .prediction import predict
from .rundir import RunDir, load_run

__all__ = ["ViT", "BlogViT", "ViTConfig", "TrainConfig", "RuntimeConfig", "PRESETS", "build_model", "load_run",
           "RunDir", "VitscopeError", "predict", "__version__"]
