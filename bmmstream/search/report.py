"""What a finished search leaves for people: best.json (the choice and how it was scored) and
scores.png (score per trial, best-so-far line, full-fidelity re-scores marked)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from bmmstream.output.writer import write_json_atomic


def best_record(result) -> dict:
    """The JSON-serialisable summary of a SearchResult."""
    finite = [t.score for t in result.trials if t.phase == "search" and math.isfinite(t.score)]
    return {
        "optimizer": result.optimizer,
        "best_params": result.best_params,
        "best_score": result.best_score,
        "best_fidelity": result.best_fidelity,
        "best_trial": result.best_trial,
        "trials": len(result.trials),
        "search_trials": sum(t.phase == "search" for t in result.trials),
        "best_search_score": max(finite) if finite else None,
        "evaluations_this_run": result.evaluations,
    }


def write_report(result, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write best.json and scores.png into `out_dir` (default: the search directory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir) if out_dir is not None else Path(result.search_dir)
    out.mkdir(parents=True, exist_ok=True)
    best_path, png_path = out / "best.json", out / "scores.png"
    write_json_atomic(best_path, best_record(result))

    search = [t for t in result.trials if t.phase == "search"]
    final = [t for t in result.trials if t.phase == "final"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [t.trial + 1 for t in search]
    ys = [t.score if math.isfinite(t.score) else float("nan") for t in search]
    fid = search[0].fidelity if search else "score"
    ax.plot(xs, ys, "o", ms=4, label=f"trial ({fid})")
    running, best = [], -math.inf
    for y in ys:
        best = max(best, y) if not math.isnan(y) else best
        running.append(best if best > -math.inf else float("nan"))
    ax.plot(xs, running, "-", lw=1.5, label="best so far")
    if final:
        ax.plot([t.trial + 1 for t in final], [t.score for t in final], "s", ms=6, label="full re-score")
    ax.set_xlabel("trial")
    ax.set_ylabel("score (higher is better)")
    ax.set_title(f"{result.optimizer}: best {result.best_score:.4g} ({result.best_fidelity})")
    ax.legend(loc="best")
    fig.tight_layout()
    tmp_png = png_path.with_name("scores.tmp.png")
    fig.savefig(tmp_png, dpi=100)
    plt.close(fig)
    os.replace(tmp_png, png_path)
    return best_path, png_path
