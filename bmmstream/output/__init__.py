"""Stage 6, output: the sharded safetensors writer (atomic renames, journal, index written last), the
run directory's files, and the helpers that make a Hugging Face folder complete.

May import: errors, config, sources, plan, statistics, solve, methods. Never pipeline or search.
"""
