"""`scorer: {kind: lm_eval}`: EleutherAI's lm-evaluation-harness on the resident model, offline, on a
local multiple-choice task (6 JSONL rows) and a tiny random Llama with a word-level tokenizer."""
from __future__ import annotations

import copy
import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bmmstream.errors import BmmError
from bmmstream.search.scorers import LM_EVAL_MISSING, make_scorers, subset

pytest.importorskip("lm_eval")

WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "the", "cat", "dog", "sat", "yes", "no", "maybe", "good", "bad", "film",
         "on", "mat", "a", "red"]
ROWS = [
    {"question": "the cat sat on", "choices": ["the mat", "a dog", "maybe"], "answer": 0},
    {"question": "was the film good", "choices": ["yes", "no"], "answer": 1},
    {"question": "a big red", "choices": ["dog", "cat sat on a mat", "film"], "answer": 2},
    {"question": "the dog", "choices": ["sat", "bad film"], "answer": 1},
    {"question": "good cat", "choices": ["yes", "no", "maybe"], "answer": 2},
    {"question": "red mat", "choices": ["a cat", "the", "good dog"], "answer": 0},
]
TASK_YAML = textwrap.dedent(
    """
    task: toy_mc
    dataset_path: json
    dataset_kwargs:
      data_files:
        test: toy.jsonl
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list:
      - metric: acc
      - metric: acc_norm
    """
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _task_dir(root: Path, rows=ROWS) -> Path:
    d = root / "tasks"
    d.mkdir(parents=True, exist_ok=True)
    (d / "toy.yaml").write_text(TASK_YAML)
    (d / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _manual_acc(model, tok, rows, norm: bool = False) -> float:
    """Accuracy from summed log-likelihoods of ' choice' after the question (lm_eval's acc / acc_norm)."""
    correct = 0
    for r in rows:
        n_ctx = len(tok(r["question"])["input_ids"])
        lls = []
        for c in r["choices"]:
            ids = tok(r["question"] + " " + c)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            ll = sum(float(logp[i - 1, ids[i]]) for i in range(n_ctx, len(ids)))
            lls.append(ll / len(c) if norm else ll)
        correct += int(np.argmax(lls)) == r["answer"]
    return correct / len(rows)


def _scorer(d: Path, tok, **kw):
    cfg = {"kind": "lm_eval", "tasks": ["toy_mc"], "include_path": str(d)}
    cfg.update(kw)
    return make_scorers(cfg, tokenizer=tok, base_dir=d.parent)


def test_equals_simple_evaluate_and_manual_loglikelihoods(tmp_path, tok, llama, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    d = _task_dir(tmp_path)
    full, proxy = _scorer(d, tok, limit=5, proxy_size=3)
    norm, _ = _scorer(d, tok, limit=5, metric="acc_norm")
    got, got_norm = full(llama), norm(llama)
    # lm_eval's own entry point on the same model object (relative data_files: run from the YAML's folder)
    monkeypatch.chdir(d)
    ref = simple_evaluate(model=HFLM(pretrained=llama, tokenizer=copy.deepcopy(tok), batch_size=8),
                          tasks=["toy_mc"], task_manager=TaskManager(include_path=str(d), include_defaults=False),
                          limit=5)["results"]["toy_mc"]
    assert got == ref["acc,none"] == _manual_acc(llama, tok, ROWS[:5])
    assert got_norm == ref["acc_norm,none"] == _manual_acc(llama, tok, ROWS[:5], norm=True)
    # the proxy: a fixed seeded subset of the full scorer's rows, its own id
    rows = [ROWS[i] for i in subset(list(range(5)), 3, 0)]
    assert proxy(llama) == _manual_acc(llama, tok, rows)
    assert proxy.id == full.id + ":proxy3:seed0" and proxy.data_hash != full.data_hash
    # trials write weights in place: the next call sees them. A zero head is uniform: every token costs
    # log V, so the shortest choice (in tokens) wins, the first of equals on ties.
    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    shortest = [int(np.argmin([len(c.split()) for c in r["choices"]])) for r in ROWS]
    expected = np.mean([s == r["answer"] for s, r in zip(shortest, ROWS)])
    assert full(model) == _manual_acc(model, tok, ROWS[:5]) and _scorer(d, tok)[0](model) == pytest.approx(expected)


def test_lower_is_better_metric_is_negated(tmp_path, tok, llama, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    d = _task_dir(tmp_path)
    (d / "ppl.yaml").write_text(textwrap.dedent(
        """
        task: toy_ppl
        dataset_path: json
        dataset_kwargs: {data_files: {test: toy.jsonl}}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{question}}"
        metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]
        """))
    full, _ = _scorer(d, tok, tasks=["toy_ppl", "toy_mc"])
    monkeypatch.chdir(d)
    ref = simple_evaluate(model=HFLM(pretrained=llama, tokenizer=copy.deepcopy(tok), batch_size=8),
                          tasks=["toy_ppl", "toy_mc"],
                          task_manager=TaskManager(include_path=str(d), include_defaults=False))["results"]
    assert ref["toy_ppl"]["word_perplexity,none"] > 1.0
    # the mean over tasks; word perplexity (lower is better) counts negated
    assert full(llama) == pytest.approx((-ref["toy_ppl"]["word_perplexity,none"] + ref["toy_mc"]["acc,none"]) / 2,
                                        rel=1e-12)


def test_cache_key_follows_data_yaml_and_limit(tmp_path, tok):
    d = _task_dir(tmp_path)
    a, _ = _scorer(d, tok, limit=4)
    assert (a.id, a.data_hash) == (lambda s: (s.id, s.data_hash))(_scorer(d, tok, limit=4)[0])
    assert _scorer(d, tok, limit=5)[0].data_hash != a.data_hash
    rows = [dict(r) for r in ROWS]
    rows[5]["answer"] = 1  # a row past the limit still changes the data
    _task_dir(tmp_path, rows)
    b, _ = _scorer(d, tok, limit=4)
    assert b.id == a.id and b.data_hash != a.data_hash
    (d / "toy.yaml").write_text(TASK_YAML.replace("{{question}}", "{{question}} ?"))
    assert _scorer(d, tok, limit=4)[0].data_hash not in (a.data_hash, b.data_hash)


def test_search_runs_end_to_end(tmp_path, tok, tiny_llama_suite):
    from bmmstream.config import load_config
    from bmmstream.search.run import search_merge

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_suite.base, base)
    tok.save_pretrained(base)  # the synthetic suite has no tokenizer
    _task_dir(tmp_path)
    cfg = {
        "base_model": str(base), "models": [{"model": str(e)} for e in tiny_llama_suite.experts],
        "merge_method": "bmm", "dtype": "float64", "out_dtype": "float32",
        "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "rho": 0.01, "blocks": 2},
        "search": {"optimizer": "random", "budget": 2, "seed": 0, "rho_range": [1e-3, 1.0], "full_top_k": 1,
                   # a task YAML named relative to this config; its data file relative to the YAML
                   "scorer": {"kind": "lm_eval", "tasks": ["tasks/toy.yaml"], "limit": 6, "batch_size": 4}},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path).search["scorer"]["kind"] == "lm_eval"
    res = search_merge(path, out=tmp_path / "best", run_dir=tmp_path / "run", device="cpu", progress=False)
    assert res["evaluations"] == 2 and 0.0 <= res["best_score"] <= 1.0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(res["output"], dtype=torch.float64)
    assert res["best_score"] == _manual_acc(merged, tok, ROWS)


def test_one_line_errors(tmp_path, tok, monkeypatch):
    d = _task_dir(tmp_path)

    def err(cfg, tokenizer=tok) -> str:
        with pytest.raises(BmmError) as e:
            make_scorers({"kind": "lm_eval", **cfg}, tokenizer=tokenizer, base_dir=tmp_path)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert err({"tasks": ["toy_mc"], "include_path": "tasks", "metric": "f1"}) == (
        "search.scorer.metric: lm_eval task 'toy_mc' has no metric 'f1' (it has: acc, acc_norm)")
    assert err({"tasks": []}) == ("search.scorer: kind 'lm_eval' needs 'tasks', a list of lm_eval task names or "
                                  "task YAML files; got []")
    assert err({"tasks": ["toy_mc"], "limit": 0}) == "search.scorer.limit must be an integer >= 1, got 0"
    assert err({"tasks": ["tasks/nope.yaml"]}) == f"search.scorer.tasks: task file {d / 'nope.yaml'} does not exist"
    assert err({"tasks": ["toy_mc"], "include_path": "nodir"}) == (
        f"search.scorer.include_path: {tmp_path / 'nodir'} is not a folder")
    assert err({"tasks": ["toy_mc"]}, tokenizer=None) == (
        "search.scorer: kind 'lm_eval' needs the base model's tokenizer")
    (d / "gone.yaml").write_text(TASK_YAML.replace("toy_mc", "toy_gone").replace("toy.jsonl", "gone.jsonl"))
    msg = err({"tasks": ["toy_gone"], "include_path": "tasks"})
    assert msg.startswith("search.scorer.tasks: lm_eval task 'toy_gone' cannot be loaded: ")
    assert str(d / "gone.jsonl") in msg
    assert err({"tasks": ["no_such_task"], "include_path": "tasks"}) == (
        f"search.scorer.tasks: unknown lm_eval task 'no_such_task' (not in include_path ['{d}'] "
        "nor lm_eval's own tasks)")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert err({"tasks": ["toy_mc"]}) == LM_EVAL_MISSING == (
        "scorer kind 'lm_eval' needs the lm_eval package: pip install 'bmmstream[lmeval]'")
