"""Flax NNX models, their specs and weight loading."""
from models.spec import ModelSpec, RopeScaling

__all__ = ["ModelSpec", "RopeScaling"]
