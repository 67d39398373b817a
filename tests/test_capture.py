"""Streamed per-site input Grams equal those of one full in-memory forward; padding never counts."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from bmmstream.statistics.capture import collect_input_grams, position_ids_from_mask
from bmmstream.errors import BmmError
from bmmstream.sources.base import TensorInfo

transformers = pytest.importorskip("transformers")


class _Reader:
    """Minimal single-file TensorSource (LocalSource is another module's job; keep this test independent)."""

    def __init__(self, folder: Path):
        self.id = str(folder)
        self.revision = None
        self._f = safe_open(str(folder / "model.safetensors"), "pt")
        self._cfg = json.loads((folder / "config.json").read_text())
        self.read: list[str] = []

    def tensor_infos(self):
        out = {}
        for k in self._f.keys():
            sl = self._f.get_slice(k)
            out[k] = TensorInfo(tuple(sl.get_shape()), sl.get_dtype())
        return out

    def config(self):
        return dict(self._cfg)

    def get(self, name):
        self.read.append(name)
        return self._f.get_tensor(name)

    def prefetch(self, names):
        pass

    def release(self, names):
        pass

    def aux_files(self):
        return []

    def aux_path(self, filename):
        raise FileNotFoundError(filename)

    def close(self):
        pass


def _llama(tmp: Path, layers: int = 2) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    m = transformers.LlamaForCausalLM(cfg)
    m.save_pretrained(tmp, safe_serialization=True)
    return tmp


def _bert(tmp: Path) -> Path:
    torch.manual_seed(1)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
    )
    m = transformers.BertModel(cfg)
    m.save_pretrained(tmp, safe_serialization=True)
    return tmp


def _roberta(tmp: Path) -> Path:
    torch.manual_seed(2)
    cfg = transformers.RobertaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=1,
    )
    m = transformers.RobertaModel(cfg)
    m.save_pretrained(tmp, safe_serialization=True)
    return tmp


def _qwen2_sliding(tmp: Path) -> Path:
    """Layer 0 full attention, layer 1 sliding-window (3 tokens): the layers get different masks."""
    torch.manual_seed(3)
    cfg = transformers.Qwen2Config(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        use_sliding_window=True, sliding_window=3, max_window_layers=1,
    )
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    m = transformers.Qwen2ForCausalLM(cfg)
    m.save_pretrained(tmp, safe_serialization=True)
    return tmp


def _bert_no_pooler(tmp: Path) -> Path:
    """A checkpoint without the pooler (as BertForMaskedLM saves it), with the usual 'bert.' prefix."""
    torch.manual_seed(4)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
    )
    m = transformers.BertForMaskedLM(cfg)
    m.save_pretrained(tmp, safe_serialization=True)
    return tmp


# real tokens of four samples, different lengths
SAMPLES = [[5, 9, 3, 17, 22, 8, 1], [7, 7, 30], [12, 40, 2, 9, 11], [3]]


def _batches(samples, batch_size, pad_to=None, left=False, pad_id=0):
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        s = pad_to or max(len(c) for c in chunk)
        ids = torch.full((len(chunk), s), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), s), dtype=torch.long)
        for r, c in enumerate(chunk):
            sl = slice(s - len(c), s) if left else slice(0, len(c))
            ids[r, sl] = torch.tensor(c)
            mask[r, sl] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _reference(folder: Path, samples, prefix: str, pad_id: int = 0, positions: bool = True):
    """One full float64 forward of the whole model (all samples in one batch) with hooks on every linear.

    positions=False: the model derives position ids from the input ids itself (RoBERTa)."""
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float64).eval()
    (b,) = _batches(samples, len(samples), pad_to=10, pad_id=pad_id)
    mask = b["attention_mask"].bool()
    out: dict[str, tuple[torch.Tensor, int]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and re.search(r"(^|\.)layers?\.\d+\.", name):

            def hook(_m, inp, _o, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1])[mask.reshape(-1)]
                out[f"{prefix}{name}.weight"] = (x.T @ x, x.shape[0])

            hooks.append(mod.register_forward_hook(hook))
    extra = {"position_ids": position_ids_from_mask(b["attention_mask"])} if positions else {}
    with torch.no_grad():
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False, **extra)
    return out


def _assert_close(a, b, tol=1e-6):
    assert set(a) == set(b)
    for k in a:
        ga, na = a[k]
        gb, nb = b[k]
        assert na == nb, k
        err = (ga - gb).norm() / gb.norm()
        assert err < tol, (k, float(err))


N_REAL = sum(len(s) for s in SAMPLES)


def test_llama_streamed_equals_full_forward(tmp_path):
    folder = _llama(tmp_path / "m")
    src = _Reader(folder)
    got = collect_input_grams(src, _batches(SAMPLES, 2), dtype=torch.float64)
    ref = _reference(folder, SAMPLES, "model.")
    assert len(got) == 2 * 7
    _assert_close(got, ref)
    # every statistic counts exactly the real tokens
    assert all(n == N_REAL for _, n in got.values())
    # sites: q/k/v share one tensor object, gate/up share one, o and down have their own
    p = "model.layers.1."
    q = got[p + "self_attn.q_proj.weight"][0]
    assert got[p + "self_attn.k_proj.weight"][0] is q and got[p + "self_attn.v_proj.weight"][0] is q
    assert got[p + "mlp.gate_proj.weight"][0] is got[p + "mlp.up_proj.weight"][0]
    assert got[p + "self_attn.o_proj.weight"][0] is not q
    assert got[p + "mlp.down_proj.weight"][0].shape == (24, 24)
    # the grams are not trivially equal across layers (the test compares something real)
    assert (got["model.layers.0.self_attn.q_proj.weight"][0] - q).norm() > 1e-3 * q.norm()


def test_bert_streamed_equals_full_forward(tmp_path):
    folder = _bert(tmp_path / "b")
    src = _Reader(folder)
    got = collect_input_grams(src, _batches(SAMPLES, 3), dtype=torch.float64)
    ref = _reference(folder, SAMPLES, "")
    assert len(got) == 2 * 6
    _assert_close(got, ref)
    assert all(n == N_REAL for _, n in got.values())
    p = "encoder.layer.0."
    q = got[p + "attention.self.query.weight"][0]
    assert got[p + "attention.self.key.weight"][0] is q and got[p + "attention.self.value.weight"][0] is q
    assert got[p + "attention.output.dense.weight"][0] is not q


def test_per_layer_masks_sliding_window(tmp_path):
    folder = _qwen2_sliding(tmp_path / "q")
    src = _Reader(folder)
    got = collect_input_grams(src, _batches(SAMPLES, 2), dtype=torch.float64)
    ref = _reference(folder, SAMPLES, "model.")
    assert len(got) == 2 * 7
    _assert_close(got, ref)


def test_checkpoint_without_pooler_and_with_prefix(tmp_path):
    folder = _bert_no_pooler(tmp_path / "mlm")
    src = _Reader(folder)
    assert not any("pooler" in k for k in src.tensor_infos())
    got = collect_input_grams(src, _batches(SAMPLES, 2), dtype=torch.float64)
    assert "bert.encoder.layer.1.output.dense.weight" in got and len(got) == 2 * 6
    ref = _reference(folder, SAMPLES, "bert.")
    _assert_close(got, ref)


def test_roberta_keeps_its_own_position_rule(tmp_path):
    folder = _roberta(tmp_path / "r")
    src = _Reader(folder)
    # pad id 0 in the batches: capture must put RoBERTa's pad id (1) in the padded slots itself
    got = collect_input_grams(src, _batches(SAMPLES, 3), dtype=torch.float64)
    ref = _reference(folder, SAMPLES, "", pad_id=1, positions=False)
    assert len(got) == 2 * 6
    _assert_close(got, ref)
    assert all(n == N_REAL for _, n in got.values())


@pytest.mark.parametrize("family", ["llama", "bert", "roberta"])
def test_padding_does_not_change_statistics(tmp_path, family):
    folder = {"llama": _llama, "bert": _bert, "roberta": _roberta}[family](tmp_path / family)
    src = _Reader(folder)
    right = collect_input_grams(src, _batches(SAMPLES, 2), dtype=torch.float64)
    more_pad = collect_input_grams(src, _batches(SAMPLES, 2, pad_to=12), dtype=torch.float64)
    left = collect_input_grams(src, _batches(SAMPLES, 2, pad_to=9, left=True), dtype=torch.float64)
    other_pad_id = collect_input_grams(src, _batches(SAMPLES, 4, pad_id=3), dtype=torch.float64)
    for variant in (more_pad, left, other_pad_id):
        _assert_close(variant, right, tol=1e-10)


def test_disk_spill_and_on_layer(tmp_path):
    folder = _llama(tmp_path / "m", layers=3)
    src = _Reader(folder)
    batches = _batches(SAMPLES, 2)
    on_device = collect_input_grams(src, batches, dtype=torch.float64)
    seen: dict[int, dict] = {}
    cache = tmp_path / "cache"
    ret = collect_input_grams(
        src, batches, dtype=torch.float64, hidden_cache_dir=cache,
        on_layer=lambda i, d: seen.__setitem__(i, d),
    )
    assert ret == {}
    assert sorted(seen) == [0, 1, 2]
    merged = {k: v for d in seen.values() for k, v in d.items()}
    assert all(k.startswith(f"model.layers.{i}.") for i, d in seen.items() for k in d)
    _assert_close(merged, on_device, tol=1e-12)
    assert list(cache.glob("hidden_*")) == []


def test_float32_default_close_to_float64(tmp_path):
    folder = _llama(tmp_path / "m")
    src = _Reader(folder)
    g64 = collect_input_grams(src, _batches(SAMPLES, 2), dtype=torch.float64)
    g32 = collect_input_grams(src, _batches(SAMPLES, 2))
    k = "model.layers.1.mlp.down_proj.weight"
    assert g32[k][0].dtype == torch.float32
    assert ((g32[k][0].double() - g64[k][0]).norm() / g64[k][0].norm()) < 1e-4


def test_missing_tensor_is_named(tmp_path):
    folder = _llama(tmp_path / "m")
    src = _Reader(folder)
    infos = src.tensor_infos()
    del infos["model.layers.1.mlp.up_proj.weight"]
    src.tensor_infos = lambda: infos
    with pytest.raises(BmmError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        collect_input_grams(src, _batches(SAMPLES, 2), dtype=torch.float64)


def test_bf16_forward_with_fp32_sums(tmp_path):
    """The GPU setting: forward in bf16, Grams accumulated in fp32; close to the float64 truth."""
    folder = _llama(tmp_path / "m")
    src = _Reader(folder)
    g64 = collect_input_grams(src, _batches(SAMPLES, 2), dtype=torch.float64)
    gbf = collect_input_grams(src, _batches(SAMPLES, 2), dtype=torch.float32, compute_dtype=torch.bfloat16)
    for k in g64:
        assert gbf[k][0].dtype == torch.float32 and gbf[k][1] == g64[k][1]
        assert ((gbf[k][0].double() - g64[k][0]).norm() / g64[k][0].norm()) < 3e-2, k
