from loraflow.models.llama_configs import llama_config
from loraflow.models.loading import cache_dir, default_model_path, load_model

__all__ = ["cache_dir", "default_model_path", "llama_config", "load_model"]
