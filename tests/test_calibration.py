"""Calibration data: text/JSONL/pre-tokenised inputs, truncation, sample counts, padding masks, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bmmstream.statistics.calibration_data import (
    CalibrationSpec,
    calibration_batches,
    load_tokenizer,
    n_tokens,
    pad_batches,
)
from bmmstream.errors import BmmError

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A real local tokenizer folder (word level, BOS added), loadable by AutoTokenizer offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    return d


def _ids(text: str) -> list[int]:
    return [2] + [WORDS.index(w) + 3 for w in text.split()]


def _rows(batches) -> list[list[int]]:
    """Real tokens of every sample, read back through the attention mask."""
    out = []
    for b in batches:
        for ids, m in zip(b["input_ids"], b["attention_mask"]):
            assert m.sum() > 0
            n = int(m.sum())
            assert m[:n].all() and not m[n:].any()  # right padding, contiguous real tokens
            out.append(ids[:n].tolist())
    return out


def test_text_file_one_sample_per_line(tmp_path, tok_dir):
    lines = ["the cat sat", "", "a dog ran far away", "on the mat", "the dog"]
    p = tmp_path / "a.txt"
    p.write_text("\n".join(lines) + "\n")
    batches = calibration_batches({"path": str(p), "batch_size": 2}, tok_dir)
    got = sorted(_rows(batches))
    assert got == sorted(_ids(t) for t in lines if t)
    assert n_tokens(batches) == sum(len(_ids(t)) for t in lines if t)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2]
    # padding uses the tokenizer's pad id
    assert (batches[-1]["input_ids"][batches[-1]["attention_mask"] == 0] == 0).all()


def test_samples_and_max_len(tmp_path, tok_dir):
    p = tmp_path / "a.txt"
    p.write_text("\n".join(["a dog ran far away"] * 3 + ["the cat"] * 5))
    batches = calibration_batches({"path": str(p), "samples": 4, "max_len": 3}, tok_dir)
    got = _rows(batches)
    assert len(got) == 4  # the first 4 samples in file order
    assert sorted(got) == sorted([_ids("a dog")] * 3 + [_ids("the cat")])


def test_jsonl_field_and_pretokenised(tmp_path, tok_dir):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps({"q": t, "other": 1}) for t in ["the cat", "a dog ran"]))
    got = sorted(_rows(calibration_batches({"path": str(p), "field": "q"}, tok_dir)))
    assert got == sorted([_ids("the cat"), _ids("a dog ran")])

    pt = tmp_path / "b.jsonl"
    rows = [[5, 6, 7, 8, 9], [4], [11, 12]]
    pt.write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
    batches = calibration_batches({"path": str(pt), "max_len": 4}, None, vocab_size=20)
    assert sorted(_rows(batches)) == sorted([[5, 6, 7, 8], [4], [11, 12]])
    assert batches[0]["input_ids"].dtype == torch.long


def test_relative_path_resolves_against_base_dir(tmp_path, tok_dir):
    (tmp_path / "c.txt").write_text("the cat\n")
    spec = CalibrationSpec.from_dict({"path": "c.txt"}, base_dir=tmp_path)
    assert spec.path == tmp_path / "c.txt" and spec.samples == 1000 and spec.max_len == 512
    assert _rows(calibration_batches(spec, load_tokenizer(tok_dir))) == [_ids("the cat")]


def test_pad_batches_sorted_and_masked():
    b = pad_batches([[1], [1, 2, 3], [4, 5]], batch_size=2, pad_id=9)
    assert b[0]["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert b[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b[1]["input_ids"].tolist() == [[1]]


def test_errors(tmp_path, tok_dir):
    with pytest.raises(BmmError, match=r"nope.txt: no such file or folder"):
        calibration_batches({"path": str(tmp_path / "nope.txt")}, tok_dir)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{not json\n')
    with pytest.raises(BmmError, match=r"bad.jsonl:2: not valid JSON"):
        calibration_batches({"path": str(bad)}, tok_dir)

    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "the cat"}\n')
    with pytest.raises(BmmError, match=r"nofield.jsonl:1: no field 'text' and no 'input_ids'"):
        calibration_batches({"path": str(nofield)}, tok_dir)

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "the cat"}\n{"input_ids": [3, 4]}\n')
    with pytest.raises(BmmError, match=r"mixed.jsonl:2: mixes text and pre-tokenised rows"):
        calibration_batches({"path": str(mixed)}, tok_dir)

    badids = tmp_path / "badids.jsonl"
    badids.write_text('{"input_ids": [3, "x"]}\n')
    with pytest.raises(BmmError, match=r"badids.jsonl:1: 'input_ids' must be a list of non-negative integers"):
        calibration_batches({"path": str(badids)}, None)

    big = tmp_path / "big.jsonl"
    big.write_text('{"input_ids": [3, 25]}\n')
    with pytest.raises(BmmError, match=r"token id 25 >= the model's vocab_size 20"):
        calibration_batches({"path": str(big)}, None, vocab_size=20)

    txt = tmp_path / "t.txt"
    txt.write_text("the cat\n")
    with pytest.raises(BmmError, match=r"text samples need the base model's tokenizer"):
        calibration_batches({"path": str(txt)}, None)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(BmmError, match=r"empty.txt: no samples found"):
        calibration_batches({"path": str(empty)}, tok_dir)

    with pytest.raises(BmmError, match=r"calibration: unknown key\(s\) \['sample'\]"):
        CalibrationSpec.from_dict({"path": "x", "sample": 3})
    with pytest.raises(BmmError, match=r"calibration: 'max_len' must be a positive integer, got 0"):
        CalibrationSpec.from_dict({"path": "x", "max_len": 0})

    with pytest.raises(BmmError, match=r"cannot load a tokenizer"):
        load_tokenizer(tmp_path)


def test_datasets_folder(tmp_path, tok_dir):
    folder = tmp_path / "ds"
    try:
        import datasets
    except ImportError:
        folder.mkdir()
        with pytest.raises(BmmError, match=r"ds: is a folder .*needs the 'datasets' package, which is not installed"):
            calibration_batches({"path": str(folder)}, tok_dir)
        return
    datasets.Dataset.from_dict({"text": ["the cat", "a dog"]}).save_to_disk(str(folder))
    got = sorted(_rows(calibration_batches({"path": str(folder)}, tok_dir)))
    assert got == sorted([_ids("the cat"), _ids("a dog")])
