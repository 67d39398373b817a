"""Experts with extended vocabularies (added tokens): a tiny real Llama (hidden 32, 2 layers, vocab 40,
word-level tokenizer), two experts that add tokens (2, and the same 2 + 1 more) with random deltas.
Rows the base has equal a dense float64 BMM-over-TA reference; added rows equal the average over the
experts that have them; the output's tokenizer and config follow `tokenizer_source`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bmmstream
from bmmstream.errors import BmmError
from bmmstream.plan.layout import build_plan
from bmmstream.solve.closed_form import dense_reference
from bmmstream.sources.local import LocalSource

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(38)]  # vocab 40
V = len(WORDS)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]")


def _base_model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).float()


def _expert(base_dir: Path, out: Path, added: list[str], seed: int) -> None:
    """The base + random deltas, with `added` tokens in its tokenizer and embeddings."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_tokens(added)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    tok.save_pretrained(out)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def suite(request, tmp_path_factory):
    tied = request.param
    d = tmp_path_factory.mktemp("vocab_tied" if tied else "vocab")
    _base_model(tied).save_pretrained(d / "base")
    _tokenizer().save_pretrained(d / "base")
    _expert(d / "base", d / "a", ["<x1>", "<x2>"], seed=1)
    _expert(d / "base", d / "b", ["<x1>", "<x2>", "<x3>"], seed=2)
    return d


def _config(d: Path, experts=("a", "b"), **extra) -> dict:
    return {
        "base_model": str(d / "base"),
        "models": [{"model": str(d / e)} for e in experts],
        "merge_method": "bmm",
        "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3},
                       "statistics": "data_free", "rho": 0.01},
        "dtype": "float64",
        "out_dtype": "float32",
        **extra,
    }


def _merge(d: Path, tmp_path: Path, **extra) -> Path:
    return bmmstream.merge(_config(d, **extra), out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu",
                           progress=False)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check(d: Path, out: Path, experts: list[str], out_rows: int, owners: dict[int, list[str]]) -> None:
    """Base rows against the dense float64 BMM-over-TA reference (experts cut to the base's rows);
    added row i against the mean over owners[i]; the model loads with transformers."""
    from transformers import AutoModelForCausalLM

    merged = _load(out)
    base = LocalSource(d / "base")
    srcs = {e: LocalSource(d / e) for e in experts}
    plan = build_plan(base.config(), base.tensor_infos())
    for m in plan.modules:
        W0 = base.get(m.name).double()
        U = torch.stack([srcs[e].get(m.name)[: W0.shape[0]].double() - W0 for e in experts])
        U0 = 0.3 * U.sum(0)
        got = merged[m.name]
        if m.shape[0] == V:
            assert got.shape == (out_rows, *m.shape[1:]), m.name
            for i in range(V, out_rows):
                ref = torch.stack([srcs[e].get(m.name)[i].double() for e in owners[i]]).mean(0)
                assert torch.allclose(got[i].double(), ref, rtol=1e-6, atol=1e-7), (m.name, i)
            got = got[:V]
        if m.kind != "linear":
            assert torch.allclose(got.double(), W0 + U0, rtol=1e-6, atol=1e-7), m.name
            continue
        G = sum(u.T @ u for u in U)
        C = sum(u @ u.T @ u for u in U)
        ref = dense_reference(G, C, U0, 0.01 * G.trace() / G.shape[0])
        assert _rel(got.double() - W0, ref) < 1e-5, m.name
    assert json.loads((out / "config.json").read_text())["vocab_size"] == out_rows
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (out_rows, 32)
    assert model.get_output_embeddings().weight.shape == (out_rows, 32)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    emb = merged["model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight.detach(), emb)
    with torch.no_grad():
        logits = model(torch.tensor([[2, 3, out_rows - 1]])).logits
    assert logits.shape == (1, 3, out_rows) and bool(torch.isfinite(logits).all())


def test_union_merges_with_the_cli_and_the_tokenizer_encodes_added_tokens(suite, tmp_path):
    """(a) `bmm merge` with tokenizer_source union; (b) the output's tokenizer encodes the added tokens."""
    import yaml
    from transformers import AutoTokenizer

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(suite, tokenizer_source="union")))
    r = subprocess.run([sys.executable, "-m", "bmmstream.cli", "merge", str(cfg), "--out", str(tmp_path / "m"),
                        "--run-dir", str(tmp_path / "r"), "--device", "cpu", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    out = tmp_path / "m"
    _check(suite, out, ["a", "b"], V + 3, {V: ["a", "b"], V + 1: ["a", "b"], V + 2: ["b"]})
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == V + 3
    assert tok.convert_tokens_to_ids(["<x1>", "<x2>", "<x3>"]) == [V, V + 1, V + 2]
    assert tok("w3 <x3> w5 <x1>", add_special_tokens=False)["input_ids"] == [5, V + 2, 7, V]


@pytest.mark.parametrize("source", ["base", "model:a", "model:b", "model:base"])
def test_base_and_model_variants(suite, tmp_path, source):
    """(c) base / model:<base>: the base's rows and tokenizer; model:<a>: a's 42 rows and tokenizer."""
    from transformers import AutoTokenizer

    name = source.removeprefix("model:")
    extra = {} if source == "base" else {"tokenizer_source": f"model:{suite / name}"}
    out = _merge(suite, tmp_path, **extra)
    added = {"base": [], "a": ["<x1>", "<x2>"], "b": ["<x1>", "<x2>", "<x3>"]}[name]
    owners = {V: ["a", "b"], V + 1: ["a", "b"], V + 2: ["b"]}
    _check(suite, out, ["a", "b"], V + len(added), owners)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == V + len(added)
    assert tok.convert_tokens_to_ids(added) == list(range(V, V + len(added)))
    folder = suite / ("base" if name == "base" else name)
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_conflicting_added_tokens_are_refused(suite, tmp_path):
    """(d) the same id is another token in two experts; the same token at two ids."""
    _expert(suite / "base", tmp_path / "c", ["<x2>", "<x1>"], seed=3)
    a, c = suite / "a", tmp_path / "c"
    cfg = _config(suite, tokenizer_source="union")
    cfg["models"] = [{"model": str(a)}, {"model": str(c)}]
    with pytest.raises(BmmError) as e:
        bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    assert str(e.value) == f"tokenizer_source union: added token id {V} is '<x1>' in '{a}' but '<x2>' in '{c}'"

    _expert(suite / "base", tmp_path / "e", ["<x9>", "<x1>"], seed=4)
    cfg["models"] = [{"model": str(a)}, {"model": str(tmp_path / "e")}]
    cfg["tokenizer_source"] = f"model:{a}"
    with pytest.raises(BmmError) as e:
        bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r2", device="cpu", progress=False)
    assert str(e.value) == (f"tokenizer_source model:{a}: added token id {V} is '<x1>' in '{a}' "
                            f"but '<x9>' in '{tmp_path / 'e'}'")
    # base mode never reads tokenizers: the conflicting added rows are dropped
    cfg["tokenizer_source"] = "base"
    out = bmmstream.merge(cfg, out=tmp_path / "m3", run_dir=tmp_path / "r3", device="cpu", progress=False)
    assert _load(out)["model.embed_tokens.weight"].shape == (V, 32)


def test_a_third_added_token_that_differs_is_refused(suite, tmp_path):
    _expert(suite / "base", tmp_path / "c", ["<x1>", "<x2>", "<x4>"], seed=3)  # <x4> where b has <x3>
    cfg = _config(suite, tokenizer_source="union")
    cfg["models"] = [{"model": str(suite / "b")}, {"model": str(tmp_path / "c")}]
    with pytest.raises(BmmError) as e:
        bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    assert str(e.value) == (f"tokenizer_source union: added token id {V + 2} is '<x3>' in '{suite / 'b'}' "
                            f"but '<x4>' in '{tmp_path / 'c'}'")


def test_an_expert_with_fewer_rows_is_refused(suite, tmp_path):
    """(e) an expert may add tokens, not drop rows: one line naming it and every table."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(suite / "base")
    model.resize_token_embeddings(V - 2)
    model.save_pretrained(tmp_path / "small")
    cfg = _config(suite, experts=())
    cfg["models"] = [{"model": str(suite / "a")}, {"model": str(tmp_path / "small")}]
    with pytest.raises(BmmError) as e:
        bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    p = tmp_path / "small"
    tables = ["model.embed_tokens.weight"] if model.config.tie_word_embeddings else [
        "lm_head.weight", "model.embed_tokens.weight"]
    assert str(e.value) == (
        f"{1 + len(tables)} problems in the inputs: expert '{p}': config.json vocab_size is {V - 2}, fewer than "
        f"the base's {V} (an expert may add tokens, not drop them); "
        + "; ".join(f"expert '{p}': tensor '{n}' has shape ({V - 2}, 32), base has ({V}, 32)" for n in tables))


def test_data_assisted_statistics_run_the_expert_through_the_base_rows(suite, tmp_path):
    """RegMean's calibration runs each expert's layers on its base-row view (config vocab_size cut too)."""
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"input_ids": [2, 3, 4 + i, 5]}) + "\n" for i in range(3)))
    cfg = _config(suite, tokenizer_source="union")
    cfg.update(merge_method="regmean", parameters={})
    for m in cfg["models"]:
        m["calibration"] = {"path": str(cal)}
    out = bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "r", device="cpu", progress=False)
    emb = _load(out)["model.embed_tokens.weight"]
    a, b = (LocalSource(suite / e).get("model.embed_tokens.weight").double() for e in "ab")
    assert emb.shape == (V + 3, 32)
    assert torch.allclose(emb[V:].double(), torch.stack([(a[V] + b[V]) / 2, (a[V + 1] + b[V + 1]) / 2, b[V + 2]]),
                          rtol=1e-6, atol=1e-7)


def test_validation_allows_only_whole_vocab_extensions():
    """Every vocab table extended to the expert's vocab_size, or the shape mismatches are listed as before."""
    from bmmstream.sources.base import TensorInfo
    from bmmstream.sources.validate import validate_sources

    class Fake:
        revision = None

        def __init__(self, id, infos, cfg):
            self.id, self._infos, self._cfg = id, {k: TensorInfo(s, "F32") for k, s in infos.items()}, cfg

        def tensor_infos(self):
            return dict(self._infos)

        def config(self):
            return dict(self._cfg)

    cfg = {"model_type": "llama", "vocab_size": 40, "hidden_size": 8}
    base = Fake("base", {"embed.weight": (40, 8), "lm_head.weight": (40, 8), "norm.weight": (8,)}, cfg)
    good = Fake("good", {"embed.weight": (43, 8), "lm_head.weight": (43, 8), "norm.weight": (8,)},
                {**cfg, "vocab_size": 43})
    validate_sources(base, [good])
    half = Fake("half", {"embed.weight": (43, 8), "lm_head.weight": (40, 8), "norm.weight": (8,)},
                {**cfg, "vocab_size": 43})
    wrong = Fake("wrong", {"embed.weight": (43, 8), "lm_head.weight": (43, 8), "norm.weight": (8,)},
                 {**cfg, "vocab_size": 44})
    with pytest.raises(BmmError) as e:
        validate_sources(base, [half, wrong])
    assert str(e.value) == (
        "5 problems in the inputs: expert 'half': config.json vocab_size is 43, base has 40; "
        "expert 'half': tensor 'embed.weight' has shape (43, 8), base has (40, 8); "
        "expert 'wrong': config.json vocab_size is 44, base has 40; "
        "expert 'wrong': tensor 'embed.weight' has shape (43, 8), base has (40, 8); "
        "expert 'wrong': tensor 'lm_head.weight' has shape (43, 8), base has (40, 8)")
