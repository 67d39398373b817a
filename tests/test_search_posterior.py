"""`search.posterior` end to end: after a search with a built-in scorer, the paper's App. B ensemble is
scored at the chosen point; its MAP figures are the search's own best score (same model, same rows),
and at beta = inf every sample is the MAP model."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from bmmstream.errors import BmmError
from bmmstream.search.run import search_merge

WORDS = ["the", "cat", "dog", "film", "good", "bad", "yes", "no", "maybe", "is"]


@pytest.fixture
def suite_with_tokenizer(tiny_llama_suite, tmp_path):
    """The tiny Llama suite, its base folder copied with a word-level tokenizer (the search's scorer
    tokenizes with the base model's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_suite.base, base)
    t = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}},
                                   unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>").save_pretrained(base)
    rows = {"a": [{"prompt": "the cat is", "choices": ["good", "bad"], "answer": i % 2} for i in range(6)],
            "b": [{"prompt": "the film is", "choices": ["yes", "no", "maybe"], "answer": i % 3} for i in range(9)]}
    for name, rs in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return base, tiny_llama_suite.experts, tmp_path


def _cfg(base, experts, d, posterior):
    return {
        "base_model": str(base), "models": [{"model": str(e)} for e in experts], "merge_method": "bmm",
        "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}},
        "dtype": "float32", "out_dtype": "float32",
        "search": {"optimizer": "random", "budget": 3, "seed": 0, "full_top_k": 1,
                   "scorer": {"kind": "label_likelihood", "data": {"a": str(d / "a.jsonl"), "b": str(d / "b.jsonl")}},
                   "posterior": posterior},
    }


def test_posterior_report_at_the_chosen_point(suite_with_tokenizer):
    base, experts, d = suite_with_tokenizer
    res = search_merge(_cfg(base, experts, d, {"samples": 3, "beta": math.inf}), out=d / "out", run_dir=d / "run",
                       device="cpu", progress=False)
    rep = json.loads((d / "run" / "search-report" / "posterior.json").read_text())
    assert rep["tasks"] == 2 and rep["samples"] == 3
    assert rep["modules"] == ["model.layers.1.mlp.down_proj.weight"]  # default: the last MLP output matrix
    assert rep["map_accuracy"] == pytest.approx(res["best_score"], abs=1e-12)
    assert rep["accuracy"] == rep["map_accuracy"] and rep["ece"] == pytest.approx(rep["map_ece"], abs=1e-12)

    res2 = search_merge(_cfg(base, experts, d, {"samples": 4, "beta": 1e-3, "seed": 1}), out=d / "out2",
                        run_dir=d / "run2", device="cpu", progress=False)
    rep2 = json.loads((d / "run2" / "search-report" / "posterior.json").read_text())
    assert rep2["map_accuracy"] == pytest.approx(res2["best_score"], abs=1e-12)
    assert 0.0 <= rep2["ece"] <= 1.0 and rep2["samples"] == 4


def test_posterior_option_errors(suite_with_tokenizer):
    base, experts, d = suite_with_tokenizer
    with pytest.raises(BmmError, match=r"^search.posterior.beta is required"):
        search_merge(_cfg(base, experts, d, {"samples": 3}), out=d / "o", run_dir=d / "r", device="cpu",
                     progress=False)
    assert not (d / "r").exists()  # refused before any work
