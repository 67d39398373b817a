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
    # other rows (a "test split"): varied prompts and answers, so the accuracy depends on the model
    rows["c"] = [{"prompt": f"the {w} is", "choices": ["good", "bad", "maybe"][: 2 + i % 2],
                  "answer": (i * 5) % (2 + i % 2)}
                 for i, w in enumerate(["cat", "dog", "film", "cat", "dog", "film", "no", "yes", "is", "the", "cat"])]
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
    assert set(rep) == {"samples", "beta", "modules", "tasks", "accuracy", "ece", "nll", "map_accuracy", "map_ece",
                        "map_nll"}  # one beta, no scorer: today's keys and the NLLs
    assert rep["nll"] == pytest.approx(rep["map_nll"], abs=1e-12)
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


def test_beta_list_is_chosen_by_validation_nll_and_reported_on_other_rows(suite_with_tokenizer):
    """beta [inf, 1e-3]: the choice is the argmin of the candidates' validation NLL; the inf candidate
    is the MAP model; posterior.scorer (a relative path, resolved from the config file's folder) puts
    the report on c.jsonl, where the MAP accuracy is that of the written output model."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bmmstream.search.scorers import make_scorers

    base, experts, d = suite_with_tokenizer
    post = {"samples": 3, "beta": [math.inf, 1e-3], "seed": 2,
            "scorer": {"kind": "label_likelihood", "data": {"c": "c.jsonl"}}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(_cfg(base, experts, d, post)))
    res = search_merge(d / "cfg.yaml", out=d / "out", run_dir=d / "run", device="cpu", progress=False)
    rep = json.loads((d / "run" / "search-report" / "posterior.json").read_text())
    cands = rep["beta_candidates"]
    assert [c["beta"] for c in cands] == [math.inf, 1e-3]
    chosen = min(cands, key=lambda c: (c["nll"], -c["beta"]))
    assert rep["beta"] == chosen["beta"] and cands[0]["nll"] != cands[1]["nll"]
    assert cands[0]["accuracy"] == cands[0]["map_accuracy"] and cands[0]["ece"] == pytest.approx(cands[0]["map_ece"])
    assert cands[0]["nll"] == pytest.approx(cands[0]["map_nll"], abs=1e-12)
    val = rep["validation"]
    assert val["tasks"] == 2 and {k: val[k] for k in ("accuracy", "ece", "nll")} == \
        {k: chosen[k] for k in ("accuracy", "ece", "nll")}
    assert val["map_accuracy"] == pytest.approx(res["best_score"], abs=1e-12)
    # the report is on c.jsonl: the MAP figures are those of the written model, scored independently
    assert rep["tasks"] == 1
    model = AutoModelForCausalLM.from_pretrained(res["output"], torch_dtype="float32")
    scorer, _ = make_scorers({"kind": "label_likelihood", "data": {"c": str(d / "c.jsonl")}},
                             tokenizer=AutoTokenizer.from_pretrained(base))
    assert rep["map_accuracy"] == pytest.approx(scorer(model), abs=1e-9)
    assert rep["map_accuracy"] != val["map_accuracy"]  # other rows indeed


def test_report_scorer_on_the_validation_rows_gives_the_search_score(suite_with_tokenizer):
    base, experts, d = suite_with_tokenizer
    post = {"samples": 2, "beta": 1e4, "scorer": {"kind": "label_likelihood",
                                                  "data": {"a": str(d / "a.jsonl"), "b": str(d / "b.jsonl")}}}
    res = search_merge(_cfg(base, experts, d, post), out=d / "out", run_dir=d / "run", device="cpu", progress=False)
    rep = json.loads((d / "run" / "search-report" / "posterior.json").read_text())
    assert "beta_candidates" not in rep and rep["beta"] == 1e4
    assert rep["map_accuracy"] == pytest.approx(res["best_score"], abs=1e-12)
    assert rep["validation"] == {k: rep[k] for k in ("tasks", "accuracy", "ece", "nll", "map_accuracy", "map_ece",
                                                     "map_nll")}  # the same rows, the same draws


def test_report_scorer_refused_before_any_work(suite_with_tokenizer):
    base, experts, d = suite_with_tokenizer
    post = {"beta": [1e3, 1e4], "scorer": {"kind": "label_likelihood", "data": {"c": "c.jsonl"}, "proxy_size": 2}}
    with pytest.raises(BmmError) as e:
        search_merge(_cfg(base, experts, d, post), out=d / "o", run_dir=d / "r", device="cpu", progress=False)
    assert str(e.value) == "search.posterior.scorer: ['proxy_size'] not allowed (the report scores every row)"
    assert not (d / "r").exists()


def test_report_scorer_missing_file_refused_before_the_search(suite_with_tokenizer):
    """posterior.scorer is built beside search.scorer, so a missing file costs no trial."""
    base, experts, d = suite_with_tokenizer
    missing = d / "nope.jsonl"
    post = {"beta": 1e4, "scorer": {"kind": "label_likelihood", "data": {"c": str(missing)}}}
    with pytest.raises(BmmError) as e:
        search_merge(_cfg(base, experts, d, post), out=d / "o", run_dir=d / "r", device="cpu", progress=False)
    assert str(e.value) == f"scorer data: {missing} does not exist"
    assert not list((d / "r").rglob("history.jsonl")) and not (d / "o").exists()
