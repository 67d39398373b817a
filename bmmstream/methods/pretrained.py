"""The pretrained anchor: U = 0 (the merged model is the base). Useful as BMM's weakest prior."""
from __future__ import annotations

import torch

from bmmstream.methods.registry import MergeMethod, ModuleInput, register


@register
class Pretrained(MergeMethod):
    name = "pretrained"
    defaults: dict = {}

    def merge(self, inp: ModuleInput) -> torch.Tensor:
        return torch.zeros_like(inp.base)
