from loraflow.models.loading import cache_dir, default_model_path, load_model

__all__ = ["cache_dir", "default_model_path", "load_model"]
