"""Every family with an architecture table: a tiny real transformers model (random weights) and two
experts, merged by `bmmstream.merge` (BMM over task arithmetic, float64), loads with transformers, and
every linear equals a float64 reference of the BMM formula computed here in the (d_out, d_in)
orientation; every other parameter is the anchor's value. Linears are found from the loaded model's
own modules (nn.Linear, Conv1D, Mixtral's fused experts), not from the tables under test."""
from __future__ import annotations

import copy
import json
import logging
import sys
import textwrap

import pytest
import torch
from torch import nn

import bmmstream
from bmmstream.errors import BmmError
from bmmstream.plan.layout import FAMILIES, build_plan
from bmmstream.sources.local import LocalSource

RHO, TA = 0.05, 0.3
H, FF, V = 32, 48, 40  # vocab differs from every hidden/ffn size, so shapes never look vocab-sized
DEC = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=V, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ENC = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
           max_position_embeddings=32, pad_token_id=0)
VIS = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=4, image_size=16,
           patch_size=8)
CASES = {  # model_type -> (config kwargs, transformers class: True causal LM, False AutoModel, or a name)
    "mistral": (DEC, True),
    "qwen2": (DEC, True),
    "qwen3": (dict(DEC, head_dim=8), True),
    "gemma": (dict(DEC, head_dim=8), True),
    "gemma2": (dict(DEC, head_dim=8), True),
    "gemma3_text": (dict(DEC, head_dim=8), True),
    "gemma3": (dict(text_config=dict(DEC, head_dim=8, vocab_size=300), mm_tokens_per_image=4, image_token_index=260,
                    boi_token_index=258, eoi_token_index=259, vision_config=dict(VIS, vision_use_head=False)),
               "AutoModelForImageTextToText"),
    "phi3": (DEC, True),
    "mixtral": (dict(DEC, num_local_experts=3, num_experts_per_tok=2), True),
    "gpt2": (dict(n_embd=H, n_layer=2, n_head=4, n_inner=FF, vocab_size=V, n_positions=32, bos_token_id=1,
                  eos_token_id=2), True),
    "bert": (ENC, False),
    "roberta": (dict(ENC, max_position_embeddings=40), False),
    "xlm-roberta": (dict(ENC, max_position_embeddings=40), False),
    "electra": (dict(ENC, embedding_size=H), False),
    "clip": (dict(text_config=dict(ENC, projection_dim=16), vision_config=VIS, projection_dim=16), False),
    "clip_vision_model": (VIS, False),
    "vit": (VIS, False),
}


def _model_class(kind: bool | str):
    import transformers

    name = {True: "AutoModelForCausalLM", False: "AutoModel"}.get(kind, kind)
    return getattr(transformers, name)


def _suite(root, family: str):
    """base/ and expert_0/, expert_1/: the base plus small random deltas on every parameter."""
    from transformers import AutoConfig

    kw, kind = CASES[family]
    torch.manual_seed(0)
    model = _model_class(kind).from_config(AutoConfig.for_model(family, **copy.deepcopy(kw)))
    model.save_pretrained(root / "base")
    experts = []
    for t in range(2):
        e = copy.deepcopy(model)
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for _, p in e.named_parameters():  # tied parameters are perturbed once
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        e.save_pretrained(root / f"expert_{t}")
        experts.append(root / f"expert_{t}")
    return root / "base", experts


def _merge(root, base, experts, **params):
    cfg = {"base_model": str(base), "models": [{"model": str(e)} for e in experts], "merge_method": "bmm",
           "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": TA}, "rho": RHO, **params},
           "dtype": "float64", "out_dtype": "float64"}
    return bmmstream.merge(cfg, out=root / "merged", run_dir=root / "run", device="cpu", progress=False)


def bmm_reference(W0: torch.Tensor, Ws: list[torch.Tensor]) -> torch.Tensor:
    """W0 + U, U = (C + lam U0)(G + lam I)^-1, data-free G, C, lam = rho tr(G)/d_in; (d_out, d_in) in."""
    U = [w - W0 for w in Ws]
    U0 = TA * sum(U)
    G = sum(u.T @ u for u in U)
    C = sum(u @ u.T @ u for u in U)
    lam = RHO * G.trace() / G.shape[0]
    A = G + lam * torch.eye(G.shape[0], dtype=G.dtype)
    return W0 + torch.linalg.solve(A, (C + lam * U0).T).T  # A symmetric


def _linears(model: nn.Module) -> dict[str, str]:
    """Parameter name -> how the model stores it: "linear" (d_out, d_in), "conv1d" (d_in, d_out),
    "experts_gate_up" / "experts_down" (Mixtral's fused [E, ., .]); lm_head is a vocab table, not here."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, mod in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(mod, nn.Linear):
            out[f"{name}.weight"] = "linear"
        elif isinstance(mod, Conv1D):
            out[f"{name}.weight"] = "conv1d"
        elif type(mod).__name__ == "Gemma3MultiModalProjector":  # x @ W: stored (d_in, d_out)
            out[f"{name}.mm_input_projection_weight"] = "conv1d"
        elif type(mod).__name__ == "MixtralExperts":
            out[f"{name}.gate_up_proj"] = "experts_gate_up"
            out[f"{name}.down_proj"] = "experts_down"
    return out


def _expected(kind: str, W0: torch.Tensor, Ws: list[torch.Tensor]) -> torch.Tensor:
    if kind == "linear":
        return bmm_reference(W0, Ws)
    if kind == "conv1d":
        return bmm_reference(W0.T, [w.T for w in Ws]).T
    rows = []
    for e in range(W0.shape[0]):  # each expert's w1 (gate), w3 (up) and w2 (down) regressed on its own
        halves = 2 if kind == "experts_gate_up" else 1
        parts = [bmm_reference(a, list(b)) for a, *b in zip(W0[e].chunk(halves), *(w[e].chunk(halves) for w in Ws))]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_merge_loads_and_equals_float64_reference(tmp_path, family):
    base, experts = _suite(tmp_path, family)
    out = _merge(tmp_path, base, experts)
    cls = _model_class(CASES[family][1])
    merged, m0, *ms = (cls.from_pretrained(p, dtype=torch.float64) for p in (out, base, *experts))
    p0, pe = dict(m0.named_parameters()), [dict(m.named_parameters()) for m in ms]
    lin = _linears(merged)
    assert lin, family
    seen, routers = 0, 0
    for n, got in merged.named_parameters():
        W0, Ws = p0[n].detach(), [p[n].detach() for p in pe]
        routers += n.endswith("mlp.gate.weight")  # Mixtral's router: never regressed, the anchor's value
        if n in lin:
            want = _expected(lin[n], W0, Ws)
            seen += 1
        else:
            want = W0 + TA * sum(w - W0 for w in Ws)
        err = float((got.detach() - want).norm() / want.norm().clamp_min(1e-30))
        assert err < 1e-9, (family, n, err)
    assert seen == len(lin) and routers == (2 if family == "mixtral" else 0)


def test_gpt2_is_regressed_on_the_input_side_not_the_stored_one(tmp_path):
    """Conv1D stores (d_in, d_out): regressing the stored matrix as if it were (d_out, d_in) gives
    another answer, so the reference above would catch a pipeline that forgot the transpose."""
    base, experts = _suite(tmp_path, "gpt2")
    out = _merge(tmp_path, base, experts)
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    b = load_file(base / "model.safetensors")
    es = [load_file(e / "model.safetensors") for e in experts]
    n = "transformer.h.0.mlp.c_fc.weight"
    W0, Ws = b[n].double(), [e[n].double() for e in es]
    right = bmm_reference(W0.T, [w.T for w in Ws]).T
    wrong = bmm_reference(W0, Ws)
    assert torch.allclose(got[n], right, rtol=0, atol=1e-12)
    assert float((wrong - right).norm() / (right - W0).norm()) > 1e-2


def test_tables_mark_exactly_conv1d_as_transposed(tmp_path):
    """The plan's `transposed` flags agree with the modules transformers builds (Conv1D <=> transposed)."""
    from transformers import AutoModelForCausalLM

    base, _ = _suite(tmp_path, "gpt2")
    src = LocalSource(base)
    plan = build_plan(src.config(), src.tensor_infos(), blocks=2)
    model = AutoModelForCausalLM.from_pretrained(base)
    conv = {n for n, k in _linears(model).items() if k == "conv1d"}
    flagged = {m.name for m in plan.modules if m.transposed}
    assert conv == flagged and len(flagged) == 8
    groups = {m.name.split("h.0.")[-1]: m.group for m in plan.modules if ".h.0." in m.name and m.kind == "linear"}
    assert groups == {"attn.c_attn.weight": "attn_in", "attn.c_proj.weight": "attn_out",
                      "mlp.c_fc.weight": "mlp_in", "mlp.c_proj.weight": "mlp_out"}


@pytest.mark.parametrize("family", ["mixtral", "phi3", "clip", "vit"])
def test_every_family_groups_all_four_and_routers_are_not_regressed(tmp_path, family):
    base, _ = _suite(tmp_path, family)
    src = LocalSource(base)
    plan = build_plan(src.config(), src.tensor_infos(), blocks=2)
    assert plan.family == family
    layer_groups = {(m.block, m.group) for m in plan.modules if m.kind == "linear" and m.layer is not None}
    assert layer_groups == {(b, g) for b in range(2) for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    if family == "mixtral":
        routers = [m for m in plan.modules if m.kind == "router"]
        assert [m.name for m in routers] == [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)]
    if family in ("clip", "vit"):  # patch convolutions and position tables are never regressed
        assert all(m.kind != "linear" for m in plan.modules if "embedding" in m.name)


def test_generic_family_says_what_it_did(tmp_path, caplog):
    from bmmstream.sources.base import TensorInfo

    infos = {f"blocks.{i}.{k}.weight": TensorInfo((8, 8), "F32") for i in range(2) for k in ("mix", "ffn")}
    with caplog.at_level(logging.WARNING, logger="bmmstream.plan.layout"):
        plan = build_plan({"model_type": "rwkv9"}, infos)
    assert plan.family == "generic" and {m.group for m in plan.modules} == {"other"}
    assert any("model family 'rwkv9' has no architecture table" in r.getMessage()
               and "all 4 linear(s) went to group 'other'" in r.getMessage() for r in caplog.records)


def test_fused_moe_experts_are_refused_in_one_line():
    from bmmstream.sources.base import TensorInfo

    n = "model.layers.0.mlp.experts.gate_up_proj"
    with pytest.raises(BmmError, match=r"^model.layers.0.mlp.experts.gate_up_proj: fused 3-D expert tensor; .*"
                                       r"\(family 'mixtral', shape \[3, 96, 32\]\)$"):
        build_plan({"model_type": "mixtral"}, {n: TensorInfo((3, 96, 32), "F32")})


def test_every_table_is_covered_here():
    assert set(CASES) | {"llama", "clip_text_model"} == set(FAMILIES)


SCORER = textwrap.dedent(
    """
    import torch
    def score(model):
        # position-dependent, so a weight written transposed or into another slice scores differently
        return -sum(float((v.detach().double() * torch.arange(v.numel(), dtype=torch.float64).reshape(v.shape).sin()).sum())
                    for k, v in sorted(model.named_parameters()) if v.dim() >= 2)
    """
)


@pytest.mark.parametrize("family", sorted(CASES))
def test_search_searches_exactly_the_family_groups(tmp_path, monkeypatch, family):
    """Each block's searched rho keys are the plan's groups of that block; the resident trials write
    every weight where transformers holds it (GPT-2's Conv1D transposed, Mixtral's experts inside the
    fused [E, ...] tensors, ViT's renamed modules): the best score is the written model's score."""
    (tmp_path / "arch_scorer.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("arch_scorer", None)
    from bmmstream.search.run import search_merge

    base, experts = _suite(tmp_path, family)
    cfg = {"base_model": str(base), "models": [{"model": str(e)} for e in experts], "merge_method": "bmm",
           "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": TA}, "rho": RHO, "blocks": 2},
           "dtype": "float64", "out_dtype": "float64",
           "search": {"optimizer": "random", "budget": 3, "seed": 0, "rho_range": [1e-3, 1.0],
                      "scorer": {"callable": "arch_scorer:score"}, "full_top_k": 1}}
    res = search_merge(cfg, out=tmp_path / "best", run_dir=tmp_path / "srun", device="cpu", progress=False)
    src = LocalSource(base)
    plan = build_plan(src.config(), src.tensor_infos(), blocks=2)
    want = [sorted({m.group for m in plan.modules if m.kind == "linear" and m.block == b} - {"other"})
            for b in range(2)]
    space = json.loads((tmp_path / "srun" / "search-report" / "space.json").read_text())
    assert space["groups"] == want and space["dropped"] == [[], []]
    (hist,) = (tmp_path / "srun").rglob("history.jsonl")
    trials = [json.loads(line)["params"]["blocks"] for line in hist.read_text().splitlines()]
    assert len(trials) >= 3 and all([sorted(b["rho"]) for b in t] == want for t in trials)
    import arch_scorer

    model = _model_class(CASES[family][1]).from_pretrained(res["output"], dtype=torch.float64)
    assert arch_scorer.score(model) == pytest.approx(res["best_score"], rel=1e-9)


def test_gpt2_data_assisted_uses_conv1d_inputs(tmp_path):
    """Data-assisted BMM on GPT-2: each Conv1D's input Gram (X_t^T X_t / n_t on expert t's own
    calibration tokens, captured by hooks on the real model here) and the transposed weights give
    U = (C + lam U0)(G + lam I)^-1 in the (d_out, d_in) orientation, written back as stored (without
    Conv1D capture every layer fell back to data-free statistics; the wrong side is off by O(1))."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, experts = _suite(tmp_path, "gpt2")
    rows = [[[3 + (7 * i + 5 * t + j) % 30 for j in range(4 + i)] for i in range(5)] for t in range(2)]
    for t in range(2):
        (tmp_path / f"cal{t}.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows[t]))
    cfg = {"base_model": str(base), "models": [{"model": str(e), "calibration": {"path": str(tmp_path / f"cal{t}.jsonl")}}
                                               for t, e in enumerate(experts)],
           "merge_method": "bmm", "dtype": "float64", "out_dtype": "float64",
           "parameters": {"anchor": "task_arithmetic", "anchor_parameters": {"scale": TA}, "rho": RHO,
                          "statistics": "data_assisted"}}
    out = bmmstream.merge(cfg, out=tmp_path / "merged", run_dir=tmp_path / "run", device="cpu", progress=False)
    got = load_file(out / "model.safetensors")
    b = load_file(base / "model.safetensors")
    es = [load_file(e / "model.safetensors") for e in experts]
    grams: list[dict[str, torch.Tensor]] = []
    for t, e in enumerate(experts):
        m = AutoModelForCausalLM.from_pretrained(e, dtype=torch.float64)
        seen: dict[str, list[torch.Tensor]] = {}
        for n, mod in m.named_modules():
            if _linears(m).get(f"{n}.weight") == "conv1d":
                mod.register_forward_hook(lambda _m, i, _o, n=n: seen.setdefault(f"{n}.weight", []).append(
                    i[0].detach().reshape(-1, i[0].shape[-1])))
        with torch.no_grad():
            for r in rows[t]:  # one sample at a time: no padding rows to remove
                m(input_ids=torch.tensor([r]))
        grams.append({n: torch.cat(x).T @ torch.cat(x) / torch.cat(x).shape[0] for n, x in seen.items()})
    assert len(grams[0]) == 8
    for n in grams[0]:
        W0 = b[n].double().T
        U = [e[n].double().T - W0 for e in es]
        G = grams[0][n] + grams[1][n]
        C = U[0] @ grams[0][n] + U[1] @ grams[1][n]
        lam = RHO * G.trace() / G.shape[0]
        want = W0 + torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), (C + lam * TA * sum(U)).T).T
        err = float((got[n].T - want).norm() / (want - W0).norm())
        assert err < 1e-4, (n, err)  # the calibration forward and its Grams run in float32


def test_gpt2_external_anchor_reads_conv1d_in_the_methods_orientation(tmp_path):
    """An already merged GPT-2 checkpoint as BMM's anchor equals anchoring on the method that made it
    (Conv1D weights are stored (d_in, d_out); the external anchor must transpose like the pipeline)."""
    base, experts = _suite(tmp_path, "gpt2")
    cfg = {"base_model": str(base), "models": [{"model": str(e)} for e in experts], "merge_method": "task_arithmetic",
           "parameters": {"scale": TA}, "dtype": "float64", "out_dtype": "float64"}
    ta = bmmstream.merge(cfg, out=tmp_path / "ta" / "merged", run_dir=tmp_path / "ta" / "run", device="cpu",
                         progress=False)
    direct = _merge(tmp_path / "direct", base, experts)
    via_external = _merge(tmp_path / "ext", base, experts, anchor="external", anchor_parameters={"path": str(ta)})
    a, b = LocalSource(direct), LocalSource(via_external)
    for name, info in a.tensor_infos().items():
        x, y = a.get(name).double(), b.get(name).double()
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12), name
