"""jmlora: a JAX engine that serves many LoRA adapters at once on one base model.

    from jmlora import LLM, SamplingParams, LoRARequest
"""

from jmlora.config import ConfigError, EngineConfig, ModelConfig, UnsupportedModelError

__version__ = "0.1.0"
__all__ = ["LLM", "ConfigError", "EngineConfig", "LoRARequest", "ModelConfig", "RequestOutput", "SamplingParams",
           "UnsupportedModelError", "__version__"]


def __getattr__(name):
    # The engine pulls in JAX and the model; import it only when asked for, so `import jmlora.config` stays light.
    if name == "LLM":
        from jmlora.entrypoints.llm import LLM
        return LLM
    if name == "SamplingParams":
        from jmlora.engine.sampling_params import SamplingParams
        return SamplingParams
    if name == "LoRARequest":
        from jmlora.lora.request import LoRARequest
        return LoRARequest
    if name == "RequestOutput":
        from jmlora.outputs import RequestOutput
        return RequestOutput
    raise AttributeError(f"module 'jmlora' has no attribute {name!r}")
