"""Streaming calibration forward: per-site input Grams X X^T of every linear layer of one expert.

Why streaming: an 8B model does not fit next to its activations on one GPU (nor in a small RAM), so
the model is walked the way quantizers calibrate: the skeleton lives on the meta device, one
decoder/encoder layer's weights are materialised from the TensorSource at a time, every calibration
batch is pushed through it, then the layer goes back to meta. Peak memory is one layer + the hidden
states of the calibration set (on the device, or on disk under `hidden_cache_dir`) + one layer's Grams.

No model code is written here: the skeleton is `transformers.AutoModel.from_config` (Llama-family causal
LMs and BERT-family encoders), and the inputs of every layer (attention mask, rotary position
embeddings, position ids, ...) are produced by the model's own `forward`, run once per batch with each
layer replaced by a stand-in that records its arguments and passes the hidden states through. Those
arguments are then replayed layer by layer, exactly as the full model passes them (so per-layer masks
of sliding-window / alternating-attention models such as Gemma 2 are right too).

Position ids: computed from the attention mask (`cumsum(mask) - 1`, as `generate()` does), and passed to
the model's forward. For right padding these are the default `arange`; for left padding they make the
real tokens see the same positions, so the statistics do not depend on where the padding is (BERT's
absolute position embeddings would otherwise shift). Models that derive positions from the input ids
themselves (RoBERTa / XLM-R: `padding_idx + cumsum(ids != pad)`) keep their own rule; for them the
padded slots are filled with `config.pad_token_id` so that rule sees the padding.

Statistics, per input site (modules that receive the very same input tensor share one site: q/k/v,
gate/up, BERT query/key/value): the raw sum S = sum_x x x^T over real tokens only (padding rows are
removed by the attention mask before the matmul) and the token count n. Per-task normalisation is left
to the caller and is explicit: the task's Gram is G_t = S_t / n_t, so a task with more calibration
tokens does not silently dominate sum_t G_t; `ModuleInput.grams` carries these G_t stacked as
[T, d_in, d_in], and C = sum_t U_t G_t is formed from the same normalised G_t.

Only linears inside the layer stack are captured; linears after it (BERT pooler, heads, lm_head) get no
Gram and methods treat them by their data-free rule.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bmmstream.errors import BmmError
from bmmstream.sources.base import TensorSource

Grams = dict[str, tuple[torch.Tensor, int]]


class _Caught(Exception):
    """Raised by the stand-in of the last layer to stop the full forward once every layer's inputs exist."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (as generate() does); padding gets position 0."""
    m = attention_mask.long()
    return ((m.cumsum(-1) - 1).clamp(min=0) * m).long()


def build_skeleton(config_dict: dict) -> nn.Module:
    """The backbone (AutoModel) on the meta device; non-persistent buffers (rotary, ids) stay real."""
    import accelerate
    from transformers import AutoConfig, AutoModel

    cfg = dict(config_dict)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise BmmError("config.json has no model_type; cannot build the calibration model")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise BmmError(f"config.json: model_type '{model_type}' unknown to transformers ({e})") from None
    config.use_cache = False
    with accelerate.init_empty_weights():
        model = AutoModel.from_config(config)
    return model.eval()


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the transformer layers (`layers` for Llama, `encoder.layer` for BERT)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and len(mod) > 0:
            return name, mod
    raise BmmError(f"{type(model).__name__}: no layer list with num_hidden_layers={n} found")


def checkpoint_prefix(model: nn.Module, names: Iterable[str], layers_path: str) -> str:
    """Prefix of the backbone's tensors in the checkpoint ("" for a bare backbone, "model." for Llama LMs)."""
    names = set(names)
    params = [n for n, _ in model.named_parameters()]
    probe = params[:1] + [p for p in params if p.startswith(layers_path + ".")][:1]
    for prefix in ("", model.base_model_prefix + "."):
        if all(prefix + p in names for p in probe):
            return prefix
    raise BmmError(
        f"checkpoint has no tensor '{params[0]}' (nor with prefix '{model.base_model_prefix}.'): "
        "not a checkpoint of this model type"
    )


def _materialise(model: nn.Module, names: list[str], source: TensorSource, prefix: str, device, dtype):
    from accelerate.utils import set_module_tensor_to_device

    available = source.tensor_infos()
    for n in names:
        key = prefix + n
        if key not in available:
            raise BmmError(f"{source.id}: tensor '{key}' is missing from the checkpoint")
        value = source.get(key)
        set_module_tensor_to_device(model, n, device, value=value, dtype=dtype)
        del value
    # the weights now live in the module: let a streaming source evict its copies
    source.release([prefix + n for n in names])


def _to_meta(model: nn.Module, names: list[str]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for n in names:
        set_module_tensor_to_device(model, n, "meta")


def _move(obj: Any, device, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts; a tensor shared by several entries (one
    mask for all layers) is moved once and stays shared."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


class _HiddenStore:
    """Hidden states between layers, one entry per batch: on the device, or spilled to disk."""

    def __init__(self, device, cache_dir: Path | None):
        self.device = device
        self.dir = Path(cache_dir) if cache_dir is not None else None
        self.mem: list[torch.Tensor | None] = []
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, i: int) -> Path:
        return self.dir / f"hidden_{i:06d}.safetensors"

    def put(self, i: int, h: torch.Tensor) -> None:
        if self.dir is None:
            while len(self.mem) <= i:
                self.mem.append(None)
            self.mem[i] = h
            return
        from safetensors.torch import save_file

        tmp = self.dir / f".hidden_{i:06d}.tmp"
        save_file({"h": h.detach().contiguous().cpu()}, str(tmp))
        os.replace(tmp, self._path(i))

    def get(self, i: int) -> torch.Tensor:
        if self.dir is None:
            return self.mem[i]
        from safetensors.torch import load_file

        return load_file(str(self._path(i)), device=str(self.device))["h"]

    def clear(self) -> None:
        self.mem = []
        if self.dir is not None:
            for p in self.dir.glob("hidden_*.safetensors"):
                p.unlink()


def _linear_names(layer: nn.Module) -> list[str]:
    """Linears whose input Gram is collected: nn.Linear and GPT-2's Conv1D (its input is x with
    d_in columns too; only its weight is stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in layer.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _accumulate(x: torch.Tensor, mask: torch.Tensor, acc: list, dtype) -> None:
    """acc = [S, n] += (x_real^T x_real, #real) with padding rows dropped before the matmul."""
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    if flat.shape[0] != mask.numel():
        raise BmmError(f"linear input has {flat.shape[0]} rows but the batch has {mask.numel()} tokens")
    xs = flat[mask.reshape(-1)].to(dtype)
    if acc[0] is None:
        acc[0] = torch.zeros(d, d, dtype=dtype, device=x.device)
    acc[0].addmm_(xs.T, xs)
    acc[1] += int(xs.shape[0])


def collect_input_grams(
    source: TensorSource,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hidden_cache_dir: Path | None = None,
    on_layer: Callable[[int, Grams], None] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Grams:
    """Per-site raw input Grams of every linear in the layer stack of one expert.

    batches: dicts with "input_ids" and "attention_mask" [B, S] (see bmmstream.statistics.calibration_data).
    dtype: accumulation dtype of the Grams; compute_dtype: dtype of the forward (default: dtype).
    hidden_cache_dir: when given, hidden states between layers are spilled there instead of being
    kept on the device. Returns {checkpoint tensor name: (sum x x^T [d_in, d_in], n_tokens)}, with
    modules that share an input site sharing one tensor object. When `on_layer` is given, each
    layer's dict is handed to it and not retained (the return value is then empty), so memory stays
    bounded by one layer.
    """
    device = torch.device(device)
    compute_dtype = compute_dtype or dtype
    model = build_skeleton(source.config())
    layers_path, layers = find_layers(model)
    prefix = checkpoint_prefix(model, source.tensor_infos(), layers_path)

    param_names = [n for n, _ in model.named_parameters()]
    outside = [n for n in param_names if not n.startswith(layers_path + ".")]
    for name, buf in list(model.named_buffers()):
        if buf.device.type != "meta":
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            mod._buffers[attr] = buf.to(device)

    # RoBERTa-style embeddings count positions over ids != pad themselves; passing ids would override it
    own_positions = any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules())
    pad_id = getattr(model.config, "pad_token_id", None)
    batches = list(batches)
    n_layers = len(layers)
    masks: list[torch.Tensor] = []
    # per batch, per layer: the (positional args after hidden_states, kwargs) the model passes that layer
    extra: list[list[tuple[tuple, dict]]] = []
    store = _HiddenStore(device, hidden_cache_dir)
    spill = hidden_cache_dir is not None

    # Embeddings (and the other small non-layer tensors) first: run the model's own forward with every
    # layer replaced by a stand-in that records its inputs (masks and rotary embeddings can differ by
    # layer, e.g. sliding-window layers) and passes the hidden states through; the last one stops it.
    # Tensors after the stack that a checkpoint may lack (BERT's pooler) stay on meta and never run.
    infos = source.tensor_infos()
    present = [n for n in outside if prefix + n in infos]
    absent = [n for n in outside if prefix + n not in infos]
    _materialise(model, present, source, prefix, device, compute_dtype)
    current: dict[str, Any] = {}

    def stand_in(li: int):
        def forward(hidden_states, *args, **kwargs):
            if li == 0:
                current["hidden"] = hidden_states
            current["layers"].append((args, kwargs))
            if li == n_layers - 1:
                raise _Caught()
            return hidden_states

        return forward

    for li, layer in enumerate(layers):
        layer.forward = stand_in(li)
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                if "input_ids" not in b or "attention_mask" not in b:
                    raise BmmError("calibration batch needs 'input_ids' and 'attention_mask'")
                ids = b["input_ids"].to(device)
                mask = b["attention_mask"].to(device)
                if pad_id is not None:
                    ids = ids.masked_fill(mask == 0, int(pad_id))
                call = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
                if not own_positions:
                    call["position_ids"] = position_ids_from_mask(mask)
                current.clear()
                current["layers"] = []
                try:
                    model(**call)
                except _Caught:
                    pass
                except (RuntimeError, NotImplementedError) as e:
                    if absent:
                        raise BmmError(
                            f"{source.id}: the forward before the first layer failed; the checkpoint lacks "
                            f"{', '.join(prefix + n for n in absent)} ({str(e).splitlines()[0]})"
                        ) from None
                    raise
                if len(current["layers"]) != n_layers:
                    raise BmmError(f"{type(model).__name__}: forward did not reach every layer")
                store.put(i, current["hidden"])
                rec = current["layers"]
                extra.append(_move(rec, "cpu") if spill else rec)
                masks.append(mask.bool())
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        current.clear()
    _to_meta(model, present)

    def layer_params(li: int) -> list[str]:
        return [n for n in param_names if n.startswith(f"{layers_path}.{li}.")]

    result: Grams = {}
    for li, layer in enumerate(layers):
        lprefix = f"{layers_path}.{li}."
        names = layer_params(li)
        if li + 1 < len(layers):
            source.prefetch([prefix + n for n in layer_params(li + 1)])
        _materialise(model, names, source, prefix, device, compute_dtype)
        lin_names = _linear_names(layer)
        seen: dict[str, torch.Tensor] = {}
        hooks = []
        for ln in lin_names:
            mod = layer.get_submodule(ln)

            def hook(_m, inputs, _out, ln=ln):
                seen[ln] = inputs[0]

            hooks.append(mod.register_forward_hook(hook))
        # site key (a leader module) -> [S, n]; module -> leader
        acc: dict[str, list] = {}
        leader: dict[str, str] = {}
        try:
            with torch.no_grad():
                for i in range(len(masks)):
                    rest, kwargs = extra[i][li]
                    if spill:
                        rest, kwargs = _move((rest, kwargs), device)
                    out = layer(store.get(i), *rest, **kwargs)
                    if isinstance(out, (tuple, list)):
                        out = out[0]
                    # group modules by the identity of their input tensor: one Gram per input site
                    groups: list[tuple[torch.Tensor, list[str]]] = []
                    for ln in lin_names:
                        if ln not in seen:
                            continue
                        for x, members in groups:
                            if seen[ln] is x:
                                members.append(ln)
                                break
                        else:
                            groups.append((seen[ln], [ln]))
                    for x, members in groups:
                        key = leader.setdefault(members[0], members[0])
                        for m in members[1:]:
                            if leader.setdefault(m, key) != key:
                                raise BmmError(f"layer {li}: input sites of '{m}' differ between batches")
                        _accumulate(x, masks[i], acc.setdefault(key, [None, 0]), dtype)
                    seen.clear()
                    store.put(i, out)
        finally:
            for h in hooks:
                h.remove()
            seen.clear()
        layer_grams: Grams = {}
        for ln, key in leader.items():
            s, n = acc[key]
            layer_grams[f"{prefix}{lprefix}{ln}.weight"] = (s, n)
        # modules sharing a site must share the same tuple contents (same tensor object)
        layer.to("meta")
        if on_layer is not None:
            on_layer(li, layer_grams)
        else:
            result.update(layer_grams)
        del acc, layer_grams
        if device.type == "cpu":
            trim_heap()
    store.clear()
    return result


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc only; a no-op elsewhere).

    Each layer allocates and frees weight-sized blocks; glibc's dynamic mmap threshold then serves
    later blocks from the heap, whose free pages stay in RSS and fragment, so without this RSS
    grows by a few MB per layer (measured in bench/calibration_memory.py and bench/rss_depth.py).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
