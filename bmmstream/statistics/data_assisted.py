"""The calibration stage of a data-assisted run: each expert's input Grams into the stats store.

For expert t, the streaming forward of capture.py runs over task t's calibration data and every
layer's per-site raw sums S = sum_x x x^T and token counts n are stored under `grams/<t>/<module>`
(one entry per input site: q/k/v share the entry of q, gate/up that of gate; `site` in the attrs
says which). An expert whose `grams/<t>` group is marked complete is skipped on resume; a partial
one is collected again from the start (its forward is one pass; per-layer resume would need the
hidden states, which are not worth keeping).
The merge then reads G_t = S_t / n_t: per-task normalisation, so a task with more tokens does not
dominate.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bmmstream.errors import BmmError
from bmmstream.statistics.store import StatsStore


def _tokenizer_dir(base, scratch: Path) -> Path | None:
    """A local folder holding the base's tokenizer files (Hub sources: copied from the cache)."""
    files = base.aux_files()
    if not any(f.startswith(("tokenizer", "vocab", "merges", "special_tokens")) for f in files):
        return None
    folder = getattr(base, "folder", None)
    if folder is not None:
        return Path(folder)
    scratch.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(base.aux_path(f), scratch / f)
    return scratch


def gram_dtype(method) -> torch.dtype:
    """The dtype calibration Grams are accumulated and stored in: the method's `gram_dtype` (BMM:
    float64 unless statistics_dtype is 'compute'), else float32. float32 sums of X^T X over
    rank-deficient calibration data leave rounding noise in G's null directions that a tiny lam
    divides by (measured: 23% relative error of the merged task vector at rho 1e-6, 37 tokens of
    rank for d_in 64, float64 run)."""
    return getattr(method, "gram_dtype", torch.float32)


def calibrate(job, store: StatsStore, progress: bool = True) -> None:
    """Collect and store Grams for every expert not yet complete."""
    from bmmstream.statistics.calibration_data import calibration_batches, load_tokenizer
    from bmmstream.statistics.capture import collect_input_grams

    cfg = job.cfg
    missing = [str(m.model) for m in cfg.models if not m.calibration]
    if missing:
        raise BmmError(
            f"statistics '{cfg.parameters.get('statistics', 'regmean')}' need calibration data for every model; "
            f"none given for: {', '.join(missing)}"
        )
    tok_dir = _tokenizer_dir(job.sources.base, job.run.root / "tokenizer")
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
    vocab = job.sources.base.config().get("vocab_size")
    for t, (entry, src) in enumerate(zip(cfg.models, job.sources.experts)):
        key = f"grams/{t}"
        if store.has(key):
            continue
        store.drop(key)
        batches = calibration_batches(entry.calibration, tokenizer, vocab_size=vocab)
        n_layers = job.plan.num_layers
        bar = tqdm(total=n_layers, desc=f"calibrate expert {t}", unit="layer", disable=not progress)

        def on_layer(layer: int, grams: dict[str, tuple[torch.Tensor, int]]) -> None:
            seen: dict[int, str] = {}
            for name in sorted(grams):
                S, n = grams[name]
                site = seen.setdefault(id(S), name)
                if site == name:
                    store.put(f"{key}/{name}", {"S": S}, {"tokens": int(n), "site": name})
                else:
                    store.put(f"{key}/{name}", {}, {"tokens": int(n), "site": site})
            bar.update(1)

        with tempfile.TemporaryDirectory(dir=job.run.root) as spill:
            collect_input_grams(
                src, batches, device=job.device, dtype=gram_dtype(job.method), compute_dtype=torch.float32,
                hidden_cache_dir=Path(spill) if getattr(cfg, "spill_hidden", False) else None,
                on_layer=on_layer,
            )
        bar.close()
        store.mark_complete(key)


def module_grams(store: StatsStore, name: str, tasks: int, device, dtype=None) -> torch.Tensor | None:
    """[T, d_in, d_in] per-task mean input Grams G_t = S_t / n_t for a module (in `dtype`, default
    the stored one: the method casts to its statistics dtype), or None if the module has no captured
    input (linears outside the layer stack)."""
    out = []
    for t in range(tasks):
        key = f"grams/{t}/{name}"
        if not store.has(key):
            return None
        attrs = store.attrs(key)
        S = store.get(f"grams/{t}/{attrs['site']}", device)["S"]
        S = S.to(dtype) if dtype is not None else S
        out.append(S / max(int(attrs["tokens"]), 1))
    return torch.stack(out)
