"""GPT-2: transformers' Conv1D layers store their weight as (d_in, d_out)."""

ARCHITECTURE = {
    "model_types": ["gpt2"],
    "rules": [
        {"pattern": r"attn\.c_attn\.weight$", "group": "attn_in", "transposed": True, "fused": "q,k,v"},
        {"pattern": r"attn\.c_proj\.weight$", "group": "attn_out", "transposed": True},
        {"pattern": r"mlp\.c_fc\.weight$", "group": "mlp_in", "transposed": True},
        {"pattern": r"mlp\.c_proj\.weight$", "group": "mlp_out", "transposed": True},
    ],
    "tied_embeddings": True,
    "notes": "Conv1D weights are transposed to (d_out, d_in) for every method and written back as stored; "
             "c_attn (fused q, k, v) is regressed as one matrix. wte/wpe are embeddings.",
}
