"""Stage 7, search: the outer hyperparameter search (DESIGN.md section 2): space, resumable driver,
cached scores, scorers and the metrics they use, report, and the search run (`bmm search`).

May import every earlier stage and the merge pipeline; nothing imports search but the entry points.

The pipeline-facing API is small:

    space = SearchSpace.from_config(cfg["search"], num_blocks=B, hybrid=False)
    result = run_search(space, evaluate, optimizer="NGOpt", budget=40, seed=0, run_dir=run_dir,
                        proxy_evaluate=proxy, scorer_id=..., data_hash=..., context=...)
    result.best_params   # {"blocks": [{"scale": s, "rho": {"attn_in": ..., ...}}, ...], "eps": ...}

`evaluate(point) -> float` (higher is better) applies a point to the resident merged model and
scores it; see bmmstream.solve.spectral for re-solving a module for a new lam with one matmul.
"""
from bmmstream.search.driver import SearchResult, check_optimizer, run_search
from bmmstream.search.space import SEARCH_GROUPS, SearchSpace, canonical

__all__ = ["SEARCH_GROUPS", "SearchResult", "SearchSpace", "canonical", "check_optimizer", "run_search"]
