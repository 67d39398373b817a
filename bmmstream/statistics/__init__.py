"""Stage 3, statistics: the Grams BMM regresses on. Data-free and hybrid Gram math (pure functions on
tensors), calibration data reading, layer-by-layer activation capture (the one place model layers are
executed), the data-assisted Gram pass, and the Zarr v3 store that keeps them on disk.

May import: errors, config, sources, plan. Never a later stage (solve, methods, output, search).
"""
