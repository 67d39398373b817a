"""PEFT LoRA adapters as experts: real adapters written by peft over a tiny float64 Llama, merged
as adapters and as their densified models (peft's merge_and_unload), which must agree."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub_fixtures import hub_env  # noqa: F401  (fixture)

import bmmstream
from bmmstream.errors import BmmError
from bmmstream.methods.registry import ModuleInput, get_method
from bmmstream.plan.layout import ModuleSpec
from bmmstream.sources import open_source
from bmmstream.sources.local import LocalSource
from bmmstream.sources.lora import LoraSource
from bmmstream.statistics.grams import (
    combine,
    datafree_stats,
    hybrid_grams,
    lowrank_combine,
    lowrank_datafree_stats,
    lowrank_grams,
    lowrank_hybrid_grams,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HIDDEN, INTER, LAYERS = 32, 64, 2
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# three experts: plain, rsLoRA, rank/alpha patterns (peft's regex-suffix matching)
ADAPTERS = {
    "plain": dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    # + a LoRA embedding (saved with its base_layer) and lm_head saved whole (modules_to_save)
    "rslora": dict(target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "embed_tokens"], use_rslora=True,
                   modules_to_save=["lm_head"]),
    "pattern": dict(target_modules=ALL, rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                    alpha_pattern={"up_proj": 3}),
}


def _llama_config(layers: int = LAYERS, hidden: int = HIDDEN):
    return transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False,
    )


def _base_model(folder: Path | None = None, **kw):
    if folder is not None:
        return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_llama_config(**kw)).to(torch.float64)


def _write_adapter(model, folder: Path, seed: int, **lora) -> None:
    """get_peft_model, lora_A and lora_B randomised (B starts at zero), modules_to_save perturbed, save_pretrained."""
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif "modules_to_save" in n:  # a fine-tuned copy, saved whole
                p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    pm.save_pretrained(folder)
    return pm


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """base/, adapters/<name>/ and dense/<name>/ (peft merge_and_unload of the same adapter)."""
    root = tmp_path_factory.mktemp("lora")
    _base_model().save_pretrained(root / "base")
    for i, (name, lora) in enumerate(ADAPTERS.items()):
        pm = _write_adapter(_base_model(root / "base"), root / "adapters" / name, seed=10 + i, **lora)
        pm.merge_and_unload().save_pretrained(root / "dense" / name)
    return root


def _config(root: Path, kind: str, method: str = "bmm", **params) -> dict:
    if method == "bmm":
        params = {"anchor": "task_arithmetic", "anchor_parameters": {"scale": 0.3}, "rho": 0.01, **params}
    return {
        "base_model": str(root / "base"),
        "models": [{"model": str(root / kind / n)} for n in ADAPTERS],
        "merge_method": method,
        "parameters": params,
        "dtype": "float64",
        "out_dtype": "float64",
    }


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_merge(a: Path, b: Path, tol: float) -> None:
    ta, tb = _load(a), _load(b)
    assert ta.keys() == tb.keys()
    for n in ta:
        err = float((ta[n] - tb[n]).norm() / tb[n].norm().clamp_min(1e-300))
        assert err < tol, (n, err)


def test_densified_tensors_equal_peft_merge_and_unload(suite):
    base = LocalSource(suite / "base")
    for name in ADAPTERS:
        src = open_source(str(suite / "adapters" / name), base=base)
        dense = LocalSource(suite / "dense" / name)
        assert isinstance(src, LoraSource) and src.adapted()
        assert src.tensor_infos().keys() == dense.tensor_infos().keys()
        for n in dense.tensor_infos():
            want = dense.get(n)
            assert torch.allclose(src.get(n), want, rtol=0, atol=1e-13), (name, n)
    # rank_pattern / alpha_pattern resolved as peft does: per-module rank and scaling
    pat = open_source(str(suite / "adapters" / "pattern"), base=base)
    B, A = pat.lora_factors("model.layers.1.self_attn.q_proj.weight")
    assert A.shape == (2, HIDDEN)
    B2, A2 = pat.lora_factors("model.layers.0.mlp.down_proj.weight")
    assert A2.shape == (6, INTER)
    assert pat.lora_factors("model.layers.0.mlp.up_proj.weight")[1].shape == (4, HIDDEN)
    ups = pat._modules["model.layers.0.mlp.up_proj.weight"]
    assert ups.scaling == 3 / 4 and pat._modules["model.layers.0.mlp.down_proj.weight"].scaling == 8 / 6
    rs = open_source(str(suite / "adapters" / "rslora"), base=base)
    assert rs._modules["model.layers.0.self_attn.q_proj.weight"].scaling == 8 / math.sqrt(4)
    assert rs.lora_factors("model.layers.0.mlp.up_proj.weight") is None  # not adapted
    assert rs.lora_factors("lm_head.weight") is None and "lm_head.weight" in rs._replaced  # saved whole
    B, A = rs.lora_factors("model.embed_tokens.weight")  # stored (vocab, dim) orientation
    assert torch.allclose(B @ A, rs.get("model.embed_tokens.weight") - base.get("model.embed_tokens.weight"),
                          rtol=0, atol=1e-13)
    assert not torch.equal(rs.get("lm_head.weight"), base.get("lm_head.weight"))


def test_bmm_merge_of_adapters_equals_densified_merge(suite, tmp_path):
    lora = bmmstream.merge(_config(suite, "adapters"), out=tmp_path / "l", run_dir=tmp_path / "rl",
                           device="cpu", progress=False)
    dense = bmmstream.merge(_config(suite, "dense"), out=tmp_path / "d", run_dir=tmp_path / "rd",
                            device="cpu", progress=False)
    _assert_same_merge(lora, dense, 1e-8)


def test_merge_statistics_use_the_factors(suite, tmp_path):
    """The pipeline hands BMM the factors of every linear (rank 0 where an adapter leaves it alone)."""
    from bmmstream.pipeline import _unit_inputs, prepare

    job = prepare(_config(suite, "adapters"), out=tmp_path / "o", run_dir=tmp_path / "r", device="cpu")
    try:
        layer = next(u for u in job.plan.units if any(".layers.0." in n for n in u))
        inputs, _ = _unit_inputs(job, layer)
        linear = [i for i in inputs if i.spec.kind == "linear"]
        assert len(linear) == 7
        for inp in linear:
            assert inp.factors is not None, inp.spec.name
            dense = torch.stack([B.double() @ A.double() for B, A in inp.factors])
            assert torch.allclose(dense, inp.deltas, rtol=0, atol=1e-13), inp.spec.name
        ranks = {i.spec.name.split(".")[-2]: [A.shape[0] for _, A in i.factors] for i in linear}
        assert ranks["q_proj"] == [4, 4, 4] and ranks["up_proj"] == [4, 0, 4] and ranks["down_proj"] == [4, 0, 6]
    finally:
        job.sources.close()


def test_adapters_mixed_with_a_full_fine_tune(suite, tmp_path):
    """One expert a full model: its modules' statistics go the dense way; the merge is the same."""
    from bmmstream.pipeline import _unit_inputs, prepare

    cfg = _config(suite, "adapters")
    cfg["models"][1]["model"] = str(suite / "dense" / "rslora")
    job = prepare(cfg, out=tmp_path / "m", run_dir=tmp_path / "rm", device="cpu")
    try:
        layer = next(u for u in job.plan.units if any(".layers.0." in n for n in u))
        linear = {i.spec.name.split(".")[-2]: i for i in _unit_inputs(job, layer)[0] if i.spec.kind == "linear"}
        assert linear["q_proj"].factors is None  # changed by the full expert
        assert linear["up_proj"].factors is not None  # unchanged by it: rank 0
    finally:
        job.sources.close()
    mixed = bmmstream.merge(cfg, out=tmp_path / "m", run_dir=tmp_path / "rm", device="cpu", progress=False)
    dense = bmmstream.merge(_config(suite, "dense"), out=tmp_path / "d", run_dir=tmp_path / "rd",
                            device="cpu", progress=False)
    _assert_same_merge(mixed, dense, 1e-8)


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}),
    ("task_arithmetic", {"scale": 0.4}),
])
def test_other_methods_on_adapters_equal_densified(suite, tmp_path, method, params):
    cfg_l, cfg_d = _config(suite, "adapters", method, **params), _config(suite, "dense", method, **params)
    lora = bmmstream.merge(cfg_l, out=tmp_path / "l", run_dir=tmp_path / "rl", device="cpu", progress=False)
    dense = bmmstream.merge(cfg_d, out=tmp_path / "d", run_dir=tmp_path / "rd", device="cpu", progress=False)
    _assert_same_merge(lora, dense, 1e-8)


@pytest.mark.parametrize("statistics", ["data_assisted", "hybrid"])
def test_data_assisted_bmm_on_adapters_equals_densified(suite, tmp_path, statistics):
    """Calibration forwards run on the densified adapters; data-assisted statistics use the factors."""
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": [(7 * i + j) % 64 for j in range(3 + i)]}) + "\n"
                             for i in range(6)))
    merged = {}
    for kind in ("adapters", "dense"):
        cfg = _config(suite, kind, statistics=statistics, eps=0.5)
        for m in cfg["models"]:
            m["calibration"] = {"path": str(calib), "samples": 6, "max_len": 8, "batch_size": 3}
        merged[kind] = bmmstream.merge(cfg, out=tmp_path / kind, run_dir=tmp_path / f"r{kind}",
                                       device="cpu", progress=False)
    _assert_same_merge(merged["adapters"], merged["dense"], 1e-8)


def test_relative_adapter_path_in_config(suite, tmp_path, monkeypatch):
    """`model: ./adapters/x` (relative to the working directory) just works."""
    monkeypatch.chdir(suite)
    cfg = _config(suite, "adapters", "task_arithmetic", scale=0.4)
    cfg["models"] = [{"model": f"./adapters/{n}"} for n in ADAPTERS]
    out = bmmstream.merge(cfg, out=tmp_path / "l", run_dir=tmp_path / "rl", device="cpu", progress=False)
    ref = bmmstream.merge(_config(suite, "dense", "task_arithmetic", scale=0.4), out=tmp_path / "d",
                          run_dir=tmp_path / "rd", device="cpu", progress=False)
    _assert_same_merge(out, ref, 1e-8)


def test_gpt2_conv1d_adapters_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores (d_in, d_out): peft saves fan_in_fan_out adapters; the factors reach the
    statistics in the (d_out, d_in) orientation the pipeline flips Conv1D to, and the merge equals the densified."""
    from bmmstream.pipeline import _unit_inputs, prepare

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).to(torch.float64).save_pretrained(tmp_path / "base")
    for i in range(2):
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float64)
        pm = _write_adapter(model, tmp_path / "adapters" / str(i), seed=20 + i,
                            target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
        pm.merge_and_unload().save_pretrained(tmp_path / "dense" / str(i))

    def config(kind: str) -> dict:
        return {"base_model": str(tmp_path / "base"), "models": [{"model": str(tmp_path / kind / str(i))} for i in range(2)],
                "merge_method": "bmm", "parameters": {"rho": 0.01}, "dtype": "float64", "out_dtype": "float64"}

    job = prepare(config("adapters"), out=tmp_path / "o", run_dir=tmp_path / "ro", device="cpu")
    try:
        unit = next(u for u in job.plan.units if any(".h.0." in n for n in u))
        linear = [i for i in _unit_inputs(job, unit)[0] if i.spec.kind == "linear"]
        assert len(linear) == 4 and all(i.spec.transposed and i.factors is not None for i in linear)
        for inp in linear:
            dense = torch.stack([B @ A for B, A in inp.factors])
            assert torch.allclose(dense, inp.deltas, rtol=0, atol=1e-13), inp.spec.name
    finally:
        job.sources.close()
    lora = bmmstream.merge(config("adapters"), out=tmp_path / "l", run_dir=tmp_path / "rl", device="cpu", progress=False)
    ref = bmmstream.merge(config("dense"), out=tmp_path / "d", run_dir=tmp_path / "rd", device="cpu", progress=False)
    _assert_same_merge(lora, ref, 1e-8)


def test_hub_adapters_equal_local(suite, tmp_path, hub_env, monkeypatch):
    """Adapters streamed from the loopback Hub over a local base: the same merge, revisions pinned in run.json."""
    from hub_fixtures import load_server_module

    root = tmp_path / "hub-root" / "org"
    root.mkdir(parents=True)
    for n in ADAPTERS:
        (root / n).symlink_to(suite / "adapters" / n, target_is_directory=True)
    srv = load_server_module().HubServer(tmp_path / "hub-root").start()
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    try:
        cfg = _config(suite, "adapters", "task_arithmetic", scale=0.4)
        cfg["models"] = [{"model": f"org/{n}"} for n in ADAPTERS]
        out = bmmstream.merge(cfg, out=tmp_path / "h", run_dir=tmp_path / "rh", device="cpu", progress=False)
    finally:
        srv.stop()
    ref = bmmstream.merge(_config(suite, "dense", "task_arithmetic", scale=0.4), out=tmp_path / "d",
                          run_dir=tmp_path / "rd", device="cpu", progress=False)
    _assert_same_merge(out, ref, 1e-8)
    pinned = json.loads((tmp_path / "rh" / "run.json").read_text())["config"]["models"]
    assert all("@" in m["model"] and len(m["model"].split("@")[1]) == 40 for m in pinned)


# -- low-rank statistics ---------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _factors(d_out: int, d_in: int, ranks: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(d_out, r, generator=g, dtype=torch.float64),
             torch.randn(r, d_in, generator=g, dtype=torch.float64)) for r in ranks]


@pytest.mark.parametrize("normalize", [False, True])  # normalize_tasks; hybrid: rescale
@pytest.mark.parametrize("d_out,d_in", [(48, 32), (24, 40)])
def test_lowrank_statistics_equal_dense(normalize, d_out, d_in):
    fs = _factors(d_out, d_in, [4, 2, 0, 7])
    U = torch.stack([B @ A for B, A in fs])
    G, C = lowrank_datafree_stats(fs, normalize, torch.float64)
    Gd, Cd = datafree_stats(U, normalize, torch.float64)
    assert _rel(G, Gd) < 1e-10 and _rel(C, Cd) < 1e-10
    for (B, A), u in zip(fs, U):
        assert torch.allclose(lowrank_grams(B, A), u.T @ u, rtol=1e-10, atol=1e-12)
    X = torch.randn(4, d_in, 3 * d_in, dtype=torch.float64)
    grams = X @ X.transpose(1, 2) / X.shape[-1]
    G, C = lowrank_combine(fs, grams, torch.float64)
    Gd, Cd = combine(U, grams, torch.float64)
    assert _rel(G, Gd) < 1e-10 and _rel(C, Cd) < 1e-10
    for eps in (0.0, 0.3, 1.0):
        low = lowrank_hybrid_grams(fs, grams, eps, rescale=normalize, dtype=torch.float64)
        dense = hybrid_grams(U, grams, eps, rescale=normalize, dtype=torch.float64)
        assert _rel(low, dense) < 1e-10, eps


def test_bmm_module_statistics_low_rank_equal_dense():
    fs = _factors(40, 24, [4, 3, 5], seed=1)
    U = torch.stack([B @ A for B, A in fs])
    spec = ModuleSpec("m.weight", (40, 24), "linear", "attn_in", 0, 0, 1)
    bmm = get_method("bmm", {"normalize_tasks": True})
    dense = bmm.module_statistics(ModuleInput(spec, torch.zeros(40, 24, dtype=torch.float64), U))
    low = bmm.module_statistics(ModuleInput(spec, torch.zeros(40, 24, dtype=torch.float64), U, factors=fs))
    assert _rel(low["G"], dense["G"]) < 1e-10 and _rel(low["C"], dense["C"]) < 1e-10


# -- refusals --------------------------------------------------------------------------------
def test_dora_adapter_refused_in_one_line(suite, tmp_path):
    model = _base_model(suite / "base")
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
                        ).save_pretrained(tmp_path / "dora")
    with pytest.raises(BmmError) as e:
        open_source(str(tmp_path / "dora"), base=LocalSource(suite / "base"))
    assert str(e.value) == (
        f"{tmp_path / 'dora'}: DoRA adapter (use_dora) is not supported; merge it into its base first "
        f"(peft: merge_and_unload().save_pretrained(out)) and give the full model"
    )


def test_missing_target_module_refused_in_one_line(suite, tmp_path):
    """An adapter trained on a 3-layer model, read over the 2-layer base."""
    _write_adapter(_base_model(layers=3), tmp_path / "deep", seed=3, target_modules=["q_proj"])
    base = LocalSource(suite / "base")
    with pytest.raises(BmmError) as e:
        open_source(str(tmp_path / "deep"), base=base)
    assert str(e.value) == (
        f"{tmp_path / 'deep'}: adapter targets module 'model.layers.2.self_attn.q_proj', but the base "
        f"model '{base.id}' has no tensor 'model.layers.2.self_attn.q_proj.weight'"
    )


def test_shape_mismatch_refused_in_one_line(suite, tmp_path):
    _write_adapter(_base_model(hidden=48), tmp_path / "wide", seed=4, target_modules=["v_proj"])
    with pytest.raises(BmmError) as e:
        open_source(str(tmp_path / "wide"), base=LocalSource(suite / "base"))
    assert str(e.value) == (
        f"{tmp_path / 'wide'}: module 'model.layers.0.self_attn.v_proj': lora_A (4, 48) and lora_B (24, 4) "
        f"do not fit the base weight (16, 32)"
    )


def test_adapter_as_base_and_base_name_mismatch(suite, tmp_path, caplog):
    with pytest.raises(BmmError) as e:
        open_source(str(suite / "adapters" / "plain"))
    assert str(e.value) == (
        f"{suite / 'adapters' / 'plain'}: a PEFT LoRA adapter (adapter_config.json) can only be an expert, "
        f"read over base_model"
    )
    # base_model_name_or_path naming another model is only a warning
    folder = tmp_path / "renamed"
    folder.mkdir()
    cfg = json.loads((suite / "adapters" / "plain" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/other-model"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(load_file(suite / "adapters" / "plain" / "adapter_model.safetensors"),
              folder / "adapter_model.safetensors")
    with caplog.at_level("WARNING"):
        src = open_source(str(folder), base=LocalSource(suite / "base"))
    assert src.adapted() and "someone/other-model" in caplog.text
