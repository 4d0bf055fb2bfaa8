"""The pure-functional decoder: config-driven parameters, checkpoint loading, paged-cache forward."""

from jmlora.model.attention import KVCache, init_kv_cache
from jmlora.model.decoder import compute_logits, forward, forward_logits
from jmlora.model.loader import CheckpointError, load_params
from jmlora.model.params import LayerParams, Params, init_params, param_shardings, param_specs
from jmlora.sharding import LOGICAL_RULES, make_mesh

__all__ = [
    "LOGICAL_RULES", "CheckpointError", "KVCache", "LayerParams", "Params", "compute_logits", "forward",
    "forward_logits", "init_kv_cache", "init_params", "load_params", "make_mesh", "param_shardings",
    "param_specs",
]
