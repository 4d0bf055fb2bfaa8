"""jmlora: a JAX engine that serves many LoRA adapters at once on one base model."""

from jmlora.config import ConfigError, ModelConfig, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "UnsupportedModelError", "__version__"]
