"""vitscope: a fast, faithful Vision Transformer for MNIST-sized images, and a window into what it learns."""
__version__ = "0.1.0"

from .config import PRESETS, RuntimeConfig, TrainConfig, ViTConfig  # noqa: E402
from .errors import VitscopeError  # noqa: E402
from .model import BlogViT, ViT, build_model  # noqa: E402
from .rundir import RunDir, load_run  # noqa: E402
from .prediction import predict  # noqa: E402

__all__ = ["ViT", "BlogViT", "ViTConfig", "TrainConfig", "RuntimeConfig", "PRESETS", "build_model", "load_run",
           "RunDir", "VitscopeError", "predict", "__version__"]
