"""Llama-style decoders: separate q/k/v/o projections, gated MLP (gate/up -> down)."""

ATTENTION = [
    {"pattern": r"self_attn\.(q_proj|k_proj|v_proj)\.weight$", "group": "attn_in"},
    {"pattern": r"self_attn\.o_proj\.weight$", "group": "attn_out"},
]
MLP = [
    {"pattern": r"mlp\.(gate_proj|up_proj)\.weight$", "group": "mlp_in"},
    {"pattern": r"mlp\.down_proj\.weight$", "group": "mlp_out"},
]

ARCHITECTURE = {
    "model_types": ["llama", "mistral", "qwen2", "qwen3"],
    "rules": ATTENTION + MLP,
    "notes": "Qwen2's q/k/v biases and Qwen3's q_norm/k_norm are vectors (the anchor's value).",
}
