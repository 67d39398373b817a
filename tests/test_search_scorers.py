import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bmmstream.errors import BmmError
from bmmstream.search.scorers import CallableScorer, data_hash, load_callable, make_scorers, subset, task_rows

WORDS = ["[PAD]", "[UNK]", "the", "cat", "dog", "sat", "yes", "no", "maybe", "good", "bad", "film"]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]")


class FavouriteToken(torch.nn.Module):
    """A causal LM stand-in whose next-token distribution always prefers one token."""

    def __init__(self, token: int | None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.token = token

    def forward(self, input_ids, attention_mask=None, **kw):
        logits = torch.zeros(*input_ids.shape, len(WORDS), dtype=torch.float64)
        if self.token is not None:
            logits[..., self.token] = 3.0
        return SimpleNamespace(logits=logits, past_key_values=None)


class ZeroEncoder(torch.nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.hidden = hidden

    def forward(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, self.hidden))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_callable_scorer(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text("def score(model):\n    return model['acc'] * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    full, proxy = make_scorers({"callable": "my_scores:score"})
    assert proxy is None and full.id == "callable:my_scores:score"
    assert full({"acc": 0.25}) == 0.5
    full, proxy = make_scorers({"callable": "my_scores:score", "proxy": {"callable": "my_scores:score"}})
    assert proxy.id == "proxy:callable:my_scores:score" != full.id
    assert isinstance(full, CallableScorer)


def test_callable_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mod_a.py").write_text("x = 1\n")
    with pytest.raises(BmmError, match=r"^search.scorer.callable must look like 'module:function', got 'nocolon'$"):
        load_callable("nocolon")
    with pytest.raises(BmmError, match=r"^search.scorer.callable: cannot import module 'no_such_mod_xyz'"):
        load_callable("no_such_mod_xyz:f")
    with pytest.raises(BmmError, match=r"^search.scorer.callable: module 'mod_a' has no callable 'x'$"):
        load_callable("mod_a:x")
    with pytest.raises(BmmError, match=r"^search.scorer: unknown key\(s\) \['bogus'\]"):
        make_scorers({"callable": "mod_a:x", "bogus": 1})
    with pytest.raises(BmmError, match=r"^search.scorer.proxy_size needs a built-in kind"):
        make_scorers({"callable": "os.path:join", "proxy_size": 3})
    with pytest.raises(BmmError, match=r"^search.scorer: kind 'label_likelihood' needs the base model's tokenizer$"):
        make_scorers({"kind": "label_likelihood", "data": {}})
    with pytest.raises(BmmError, match=r"give 'callable: module:function' or 'kind' one of"):
        make_scorers({"kind": "bleu"}, tokenizer=object())


def test_data_hash_and_subset(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"x": 1}])
    h1 = data_hash(a)
    assert data_hash(a) == h1 and data_hash(str(a)) == h1
    _write_jsonl(a, [{"x": 2}])
    assert data_hash(a) != h1
    assert data_hash({"k": [1, 2]}) == data_hash({"k": [1, 2]}) != data_hash({"k": [2, 1]})
    rows = list(range(100))
    s = subset(rows, 10, seed=0)
    assert s == subset(rows, 10, seed=0) and s == sorted(s) and len(set(s)) == 10
    assert s != subset(rows, 10, seed=1)
    assert subset(rows, 200) == rows


def test_label_likelihood_scorer_and_proxy(tmp_path, tok):
    yes, no = WORDS.index("yes"), WORDS.index("no")
    rows_a = [{"prompt": "the cat", "choices": ["yes", "no"], "answer": "yes" if i % 4 else "no"} for i in range(8)]
    rows_b = [{"prompt": "good film", "choices": ["no", "yes", "maybe"], "answer": 1 if i < 2 else 0}
              for i in range(8)]
    cfg = {"kind": "label_likelihood", "proxy_size": 3,
           "data": {"a": str(_write_jsonl(tmp_path / "a.jsonl", rows_a)), "b": "b.jsonl"}}
    _write_jsonl(tmp_path / "b.jsonl", rows_b)
    full, proxy = make_scorers(cfg, tokenizer=tok, base_dir=tmp_path)
    model = FavouriteToken(yes)  # always picks "yes"
    # task a: 6 of 8 answers are yes; task b: 2 of 8 -> mean 0.5
    assert full(model) == pytest.approx((6 / 8 + 2 / 8) / 2)
    assert full(FavouriteToken(no)) == pytest.approx((2 / 8 + 6 / 8) / 2)
    # per-row scores for the search's bootstrap guard: each row's correctness, in task order
    score, rows = full.scored(model)
    assert score == full(model)
    assert rows == [float(r["answer"] == "yes") for r in rows_a] + [float(r["answer"] == 1) for r in rows_b]
    preds = full.predict(model)  # per task: choice log-probabilities (-inf past a row's choices), answers
    assert [lg.shape for lg, _ in preds] == [(8, 2), (8, 3)]
    for (lg, lb), rs in zip(preds, (rows_a, rows_b)):
        assert ((lg.argmax(1) == lb).double().mean()) == pytest.approx(
            sum(float(r["answer"] in ("yes", 1)) for r in rs) / 8)
    # the proxy scores the fixed seeded subset of 3 rows per task
    sub_a, sub_b = subset(rows_a, 3), subset(rows_b, 3)
    expect = (sum(r["answer"] == "yes" for r in sub_a) / 3 + sum(r["answer"] == 1 for r in sub_b) / 3) / 2
    assert proxy(model) == pytest.approx(expect)
    assert proxy.id != full.id and proxy.data_hash != full.data_hash
    # an explicit proxy on other data: its data hash is part of its id (the search keys scores by id)
    _write_jsonl(tmp_path / "p.jsonl", rows_a[:2])
    explicit = {"kind": "label_likelihood", "data": {"a": "a.jsonl"},
                "proxy": {"kind": "label_likelihood", "data": {"a": "p.jsonl"}}}
    _, p1 = make_scorers(explicit, tokenizer=tok, base_dir=tmp_path)
    _write_jsonl(tmp_path / "p.jsonl", rows_a[2:4])
    _, p2 = make_scorers(explicit, tokenizer=tok, base_dir=tmp_path)
    assert p1.id.startswith("proxy:label_likelihood:data=") and p1.id != p2.id
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "the", "choices": ["yes"]}])
    with pytest.raises(BmmError, match=r"label_likelihood task 'a': a row lacks \['answer'\]$"):
        make_scorers({"kind": "label_likelihood", "data": {"a": str(bad)}}, tokenizer=tok)


def test_encoder_accuracy_scorer(tmp_path, tok):
    expert = tmp_path / "expert_sst"
    expert.mkdir()
    save_file({"weight": torch.zeros(2, 4), "bias": torch.tensor([0.0, 5.0])}, str(expert / "head.safetensors"))
    (expert / "task.json").write_text(json.dumps({"task": "sst", "labels": ["neg", "pos"], "max_len": 16}))
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
            {"text": "the cat", "label": "pos"}, {"text": "the dog", "label": "pos"}]
    _write_jsonl(tmp_path / "val.jsonl", rows)
    full, proxy = make_scorers({"kind": "encoder_accuracy", "data": {"sst": {"rows": "val.jsonl", "expert": str(expert)}}},
                               tokenizer=tok, base_dir=tmp_path)
    assert proxy is None
    assert full(ZeroEncoder()) == pytest.approx(3 / 4)  # the head always says "pos"
    assert full.scored(ZeroEncoder()) == (0.75, [1.0, 0.0, 1.0, 1.0])
    [(logits, labels)] = full.predict(ZeroEncoder())  # posterior sampling's input: the head's logits
    assert torch.equal(labels, torch.tensor([1, 0, 1, 1])) and torch.equal(logits, torch.tensor([[0.0, 5.0]] * 4))
    with pytest.raises(BmmError, match=r"search.scorer.data.sst: .*missing_expert/head.safetensors does not exist$"):
        make_scorers({"kind": "encoder_accuracy", "data": {"sst": {"rows": "val.jsonl", "expert": "missing_expert"}}},
                     tokenizer=tok, base_dir=tmp_path)


def test_task_rows_weigh_tasks_as_the_score_does():
    """Tasks of unequal size: the score is the mean of per-task accuracies, and so is the rows' plain mean."""
    score, rows = task_rows([[1, 0], [1, 1, 1, 0, 0, 0]])
    assert score == pytest.approx((1 / 2 + 3 / 6) / 2)
    assert rows == pytest.approx([2.0, 0.0, 2 / 3, 2 / 3, 2 / 3, 0.0, 0.0, 0.0])
    assert sum(rows) / len(rows) == pytest.approx(score)
    score, rows = task_rows([[1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1, 1]])
    assert sum(rows) / len(rows) == pytest.approx(score) == pytest.approx((1 / 3 + 2 / 9) / 2)


def test_callable_scorer_may_give_rows(tmp_path, monkeypatch):
    (tmp_path / "rowfn.py").write_text("def score(model):\n    return (0.5, [1, 0])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    full, _ = make_scorers({"callable": "rowfn:score"})
    assert full.scored(None) == (0.5, [1.0, 0.0])


def test_perplexity_scorer(tmp_path, tok):
    (tmp_path / "texts.txt").write_text("the cat sat\n\nthe dog sat good film\n")
    full, _ = make_scorers({"kind": "perplexity", "data": "texts.txt"}, tokenizer=tok, base_dir=tmp_path)
    # uniform next-token distribution: perplexity = vocabulary size; the score is its negative
    assert full(FavouriteToken(None)) == pytest.approx(-len(WORDS))
