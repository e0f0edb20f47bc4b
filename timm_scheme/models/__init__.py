"""SCHEME models registered in timm's model registry (importing this package registers them)."""
from .schemeformer import SchemeFormer

__all__ = ["SchemeFormer"]
