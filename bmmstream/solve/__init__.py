"""Stage 4, solve: BMM's closed form (batched Cholesky with damping retries) and the spectral re-solve
that makes one lam trial a matmul. Pure functions on tensors.

May import: errors, config, sources, plan, statistics. Never a later stage (methods, output, search).
"""
