from .checkpoint import find_weight_files, load_model

__all__ = ["find_weight_files", "load_model"]
