"""Stage 5, methods: merge methods, one file each (its source cited in the docstring), found through
the registry; any of them can be BMM's anchor. `magnitude_histogram` holds TIES' numba kernel.

May import: errors, config, sources, plan, statistics, solve. Never output, pipeline or search.
"""
from bmmstream.methods.registry import MergeMethod, ModuleInput, get_method, method_names, register

__all__ = ["MergeMethod", "ModuleInput", "get_method", "method_names", "register"]
