"""Phi-3: fused qkv_proj and gate_up_proj."""

ARCHITECTURE = {
    "model_types": ["phi3"],
    "rules": [
        {"pattern": r"self_attn\.qkv_proj\.weight$", "group": "attn_in", "fused": "q,k,v"},
        {"pattern": r"self_attn\.o_proj\.weight$", "group": "attn_out"},
        {"pattern": r"mlp\.gate_up_proj\.weight$", "group": "mlp_in", "fused": "gate,up"},
        {"pattern": r"mlp\.down_proj\.weight$", "group": "mlp_out"},
    ],
    "notes": "qkv_proj and gate_up_proj are regressed as whole matrices (one G over the stacked rows): "
             "data-assisted statistics equal the split modules' (q, k, v share one input), data-free G "
             "sums the q, k and v task vectors' Grams.",
}
