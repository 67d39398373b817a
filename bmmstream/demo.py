"""`bmm demo` and the synthetic checkpoints it (and the tests and benchmarks) build.


Every tensor is a pure function of (seed, tensor name, expert index), so any layer can be
regenerated on its own (tests compare against it without reading files) and the files are written
one tensor at a time through ShardWriter: the model is never whole in memory.

  base      W_pre = N(0, 0.02^2) for 2-D weights, 1 for norm scales, 0 for biases
  expert t  W_t = W_pre + U_t,  U_t = delta_scale / sqrt(rank) * A_t B_t  (A_t: d_out x r, B_t: r x d_in)
                               + noise * delta_scale * N(0, 1)            (dense, every tensor)
so the low-rank part has entry RMS ~ delta_scale and the dense part is `noise` times smaller.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import yaml

from bmmstream.output.writer import ShardWriter, write_text_atomic
from bmmstream.sources.base import TORCH_TO_ST

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JOURNAL = ".synthetic-write-journal.jsonl"


def _generator(seed: int, *parts) -> torch.Generator:
    key = "/".join(str(p) for p in (seed, *parts)).encode()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))
    return g


@dataclass(frozen=True)
class LlamaSpec:
    """Sizes and randomness of a synthetic Llama suite; `tensor()` regenerates any tensor."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 128
    rank: int = 4
    noise: float = 0.01
    delta_scale: float = 0.005
    init_std: float = 0.02
    dtype: str = "float32"
    seed: int = 0

    family: ClassVar[str] = "llama"

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must be divisible by heads, and heads by kv_heads")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layout(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, safetensors dtype) in the order transformers lists a LlamaForCausalLM."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        st = TORCH_TO_ST[DTYPES[self.dtype]]
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for l in range(self.layers):
            p = f"model.layers.{l}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return [(n, s, st) for n, s in out]

    def base_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """W_pre in float32: norm scales 1, biases 0, matrices N(0, init_std^2)."""
        if len(shape) == 1:
            return torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)
        return torch.randn(shape, generator=_generator(self.seed, name, "base")) * self.init_std

    def task_vector(self, name: str, shape: tuple[int, ...], expert: int) -> torch.Tensor:
        """U_t in float32 (before rounding to the file dtype)."""
        g = _generator(self.seed, name, "expert", expert)
        u = torch.randn(shape, generator=g) * (self.noise * self.delta_scale)
        if len(shape) == 2 and self.rank > 0:
            r = min(self.rank, *shape)
            a = torch.randn(shape[0], r, generator=g)
            b = torch.randn(r, shape[1], generator=g)
            u += (a @ b) * (self.delta_scale / math.sqrt(r))
        return u

    def tensor(self, name: str, expert: int | None = None) -> torch.Tensor:
        """The tensor as stored in the file: base (expert=None) or expert `expert` (0-based)."""
        shape = dict((n, s) for n, s, _ in self.layout())[name]
        w = self.base_tensor(name, shape)
        if expert is not None:
            w = w + self.task_vector(name, shape, expert)
        return w.to(DTYPES[self.dtype])

    def hf_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
            bos_token_id=1,
            eos_token_id=2,
            dtype=self.dtype,
        )


@dataclass
class SuiteInfo:
    base: Path
    experts: list[Path]
    spec: LlamaSpec = field(default_factory=LlamaSpec)  # regenerates any tensor: spec.tensor(name, t)


def _write_folder_files(folder: Path, spec: LlamaSpec) -> None:
    from transformers import GenerationConfig

    cfg = spec.hf_config()
    write_text_atomic(folder / "config.json", cfg.to_json_string(use_diff=False))
    gen = GenerationConfig.from_model_config(cfg)
    write_text_atomic(folder / "generation_config.json", gen.to_json_string(use_diff=True))


def make_llama_suite(
    out: Path,
    *,
    num_experts: int = 3,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    rank: int = 4,
    noise: float = 0.01,
    delta_scale: float = 0.005,
    dtype: str = "float32",
    seed: int = 0,
    shard_bytes: int = 2 * 1024**3,
) -> SuiteInfo:
    """Write out/base and out/expert_0..T-1 as Hugging Face Llama folders, one tensor at a time.

    Re-running with the same arguments after an interruption resumes where it stopped.
    """
    spec = LlamaSpec(hidden, intermediate, layers, heads, kv_heads, vocab, rank, noise,
                     delta_scale, 0.02, dtype, seed)
    return write_suite(Path(out), spec, num_experts, shard_bytes)


def write_suite(out: Path, spec, num_experts: int, shard_bytes: int = 2 * 1024**3) -> SuiteInfo:
    """Write out/base and out/expert_* for any spec with layout/base_tensor/task_vector/hf_config."""
    folders = [out / "base"] + [out / f"expert_{t}" for t in range(num_experts)]
    layout = spec.layout()
    torch_dtype = DTYPES[spec.dtype]
    writers = []
    try:
        for f in folders:
            f.mkdir(parents=True, exist_ok=True)
            writers.append(ShardWriter(f, layout, shard_bytes, f / JOURNAL,
                                       metadata={"bmmstream_synthetic": spec.family}))
        for name, shape, _ in layout:
            if all(w.done(name) for w in writers):
                continue
            base = spec.base_tensor(name, shape)
            if not writers[0].done(name):
                writers[0].write(name, base.to(torch_dtype))
            for t, w in enumerate(writers[1:]):
                if not w.done(name):
                    w.write(name, (base + spec.task_vector(name, shape, t)).to(torch_dtype))
        for f, w in zip(folders, writers):
            w.finalize()
            w.close()
            _write_folder_files(f, spec)
            (f / JOURNAL).unlink()
    finally:
        for w in writers:
            w.close()
    return SuiteInfo(folders[0], folders[1:], spec)


@dataclass(frozen=True)
class BertSpec(LlamaSpec):
    """A BERT encoder (transformers BertModel names, loadable with AutoModel)."""

    max_positions: int = 64
    type_vocab: int = 2

    family: ClassVar[str] = "bert"

    def layout(self) -> list[tuple[str, tuple[int, ...], str]]:
        h, i = self.hidden, self.intermediate
        st = TORCH_TO_ST[DTYPES[self.dtype]]
        e = "embeddings."
        out = [(e + "word_embeddings.weight", (self.vocab, h)),
               (e + "position_embeddings.weight", (self.max_positions, h)),
               (e + "token_type_embeddings.weight", (self.type_vocab, h)),
               (e + "LayerNorm.weight", (h,)), (e + "LayerNorm.bias", (h,))]
        for l in range(self.layers):
            p = f"encoder.layer.{l}."
            for mod, shape in [("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                               ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                               ("attention.output.LayerNorm", None), ("intermediate.dense", (i, h)),
                               ("output.dense", (h, i)), ("output.LayerNorm", None)]:
                rows = h if shape is None else shape[0]
                out += [(p + mod + ".weight", shape or (h,)), (p + mod + ".bias", (rows,))]
        out += [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]
        return [(n, s, st) for n, s in out]

    def hf_config(self):
        from transformers import BertConfig

        return BertConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=self.max_positions,
            type_vocab_size=self.type_vocab,
            architectures=["BertModel"],
            dtype=self.dtype,
        )


def make_bert_suite(
    out: Path,
    *,
    num_experts: int = 3,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    vocab: int = 128,
    max_positions: int = 64,
    rank: int = 4,
    noise: float = 0.01,
    delta_scale: float = 0.005,
    dtype: str = "float32",
    seed: int = 0,
    shard_bytes: int = 2 * 1024**3,
) -> SuiteInfo:
    """Like make_llama_suite, for a BERT encoder (out/base, out/expert_*; AutoModel loads them)."""
    spec = BertSpec(hidden, intermediate, layers, heads, heads, vocab, rank, noise, delta_scale,
                    0.02, dtype, seed, max_positions)
    return write_suite(Path(out), spec, num_experts, shard_bytes)


# ---- `bmm demo` --------------------------------------------------------------------------------
def demo_config(base: Path, experts: list[Path]) -> dict:
    return {
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "merge_method": "bmm",
        "parameters": {
            "anchor": "task_arithmetic",
            "anchor_parameters": {"scale": 0.3},
            "statistics": "data_free",
            "rho": 0.01,
            "scale": 1.0,
            "blocks": 2,
        },
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "shard_size": "200KB",
    }


def run_demo(directory: Path, *, device: str = "auto", progress: bool = True) -> Path:
    from bmmstream.api import merge

    directory = Path(directory)
    suite_dir = directory / "checkpoints"
    if not (suite_dir / "base" / "config.json").exists():
        suite = make_llama_suite(suite_dir, num_experts=3, hidden=64, intermediate=176, layers=4, vocab=256, seed=0)
        base, experts = suite.base, suite.experts
    else:
        base = suite_dir / "base"
        experts = sorted(p for p in suite_dir.iterdir() if p.name.startswith("expert"))
    cfg = demo_config(base, experts)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "merge.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return merge(cfg, out=directory / "merged", run_dir=directory / "run", device=device, progress=progress)
