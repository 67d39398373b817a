"""Stage 2, plan: which tensors a merge has (modules, kinds, groups, layers, blocks, streaming units)
and what a run will cost (memory, disk, FLOPs, time), from the safetensors headers alone.

May import: errors, config, sources. Never a later stage.
"""
