"""Merge methods, one file each, found through the registry."""
from bmmstream.methods.registry import MergeMethod, ModuleInput, get_method, method_names, register

__all__ = ["MergeMethod", "ModuleInput", "get_method", "method_names", "register"]
