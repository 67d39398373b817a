import json
import subprocess
import sys
from pathlib import Path

import torch

from bmmstream.sources.local import LocalSource
from bmmstream.demo import LlamaSpec, make_llama_suite

ROOT = Path(__file__).resolve().parent.parent


def test_transformers_loads_every_folder_without_missing_keys(tiny_llama_suite):
    from transformers import AutoModelForCausalLM

    suite = tiny_llama_suite
    assert len(suite.experts) == 3
    for t, folder in [(None, suite.base), (1, suite.experts[1])]:
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False
        assert (folder / "generation_config.json").is_file()
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
        assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
        assert info["mismatched_keys"] == set()
        sd = model.state_dict()
        assert set(sd) == {n for n, _, _ in suite.spec.layout()}
        for name, value in sd.items():
            assert torch.equal(value, suite.spec.tensor(name, t)), name
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 9]])).logits
        assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()
    assert not list(suite.base.glob(".*"))  # no journal or temporary files left behind


def test_task_vectors_are_low_rank_plus_small_noise(tiny_llama_suite):
    spec = tiny_llama_suite.spec
    base = LocalSource(tiny_llama_suite.base)
    name = "model.layers.1.mlp.up_proj.weight"
    w0 = base.get(name).double()
    assert abs(w0.std().item() - 0.02) < 0.002
    assert torch.equal(base.get("model.layers.0.input_layernorm.weight"), torch.ones(64))
    deltas = []
    for t, folder in enumerate(tiny_llama_suite.experts):
        u = LocalSource(folder).get(name).double() - w0
        s = torch.linalg.svdvals(u)
        rms = u.pow(2).mean().sqrt().item()
        assert 0.8 * spec.delta_scale < rms < 1.2 * spec.delta_scale
        # energy beyond rank r is the dense noise: (noise * delta_scale)^2 per entry, i.e. ~1e-4 of the total
        tail = s[spec.rank:].pow(2).sum() / s.pow(2).sum()
        assert 1e-6 < tail.item() < 1e-3
        deltas.append(u)
    # experts differ from each other (independent task vectors)
    cos = torch.nn.functional.cosine_similarity(deltas[0].flatten(), deltas[1].flatten(), dim=0)
    assert abs(cos.item()) < 0.3


def test_deterministic_sharded_bf16_and_independent_of_layers(tmp_path):
    a = make_llama_suite(tmp_path / "a", num_experts=2, layers=2, dtype="bfloat16", shard_bytes=20_000, seed=3)
    b = make_llama_suite(tmp_path / "b", num_experts=2, layers=3, dtype="bfloat16", shard_bytes=20_000, seed=3)
    src_a, src_b = LocalSource(a.experts[1]), LocalSource(b.experts[1])
    assert len(list(a.experts[1].glob("model-*-of-*.safetensors"))) > 1
    assert (a.experts[1] / "model.safetensors.index.json").is_file()
    infos = src_a.tensor_infos()
    assert {i.dtype for i in infos.values()} == {"BF16"}
    # a tensor depends on (seed, name, expert) only: the deeper model shares layers 0-1 exactly
    for name in infos:
        assert torch.equal(src_a.get(name), src_b.get(name)), name
        assert torch.equal(src_a.get(name), a.spec.tensor(name, 1))
    # a different seed gives different weights
    other = LlamaSpec(seed=4, dtype="bfloat16")
    assert not torch.equal(other.tensor("lm_head.weight", 1), a.spec.tensor("lm_head.weight", 1))
    # rerunning gives byte-identical files
    c = make_llama_suite(tmp_path / "c", num_experts=2, layers=2, dtype="bfloat16", shard_bytes=20_000, seed=3)
    for f in sorted(a.experts[1].iterdir()):
        assert f.read_bytes() == (c.experts[1] / f.name).read_bytes(), f.name


def test_cli(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_checkpoints.py"), "--out", str(tmp_path / "s"),
         "-T", "2", "--layers", "1", "--hidden", "32", "--intermediate", "48", "--vocab", "64",
         "--rank", "2", "--dtype", "float16"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    src = LocalSource(tmp_path / "s" / "expert_1")
    assert src.tensor_infos()["model.layers.0.mlp.down_proj.weight"].shape == (32, 48)
    assert src.tensor_infos()["model.embed_tokens.weight"].dtype == "F16"
    assert src.config()["num_hidden_layers"] == 1
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["base", "expert_0", "expert_1"]


def test_bert_suite_loads_with_automodel(tmp_path):
    from transformers import AutoModel

    from bmmstream.demo import make_bert_suite

    suite = make_bert_suite(tmp_path / "bert", num_experts=2, layers=1, hidden=32, intermediate=48, vocab=64)
    assert LocalSource(suite.base).config()["model_type"] == "bert"
    model, info = AutoModel.from_pretrained(suite.experts[0], output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    sd = model.state_dict()
    assert set(sd) == {n for n, _, _ in suite.spec.layout()}
    for name, value in sd.items():
        assert torch.equal(value, suite.spec.tensor(name, 0)), name
    assert torch.equal(sd["encoder.layer.0.output.dense.bias"] - suite.spec.tensor("encoder.layer.0.output.dense.bias"),
                       suite.spec.task_vector("encoder.layer.0.output.dense.bias", (32,), 0))
    with torch.no_grad():
        out = model(torch.tensor([[2, 7, 3]])).last_hidden_state
    assert out.shape == (1, 3, 32) and torch.isfinite(out).all()
