"""CLIP (CLIPModel, CLIPVisionModel, CLIPTextModel)."""

ARCHITECTURE = {
    "model_types": ["clip", "clip_vision_model", "clip_text_model"],
    "rules": [
        {"pattern": r"self_attn\.(q_proj|k_proj|v_proj)\.weight$", "group": "attn_in"},
        {"pattern": r"self_attn\.out_proj\.weight$", "group": "attn_out"},
        {"pattern": r"mlp\.fc1\.weight$", "group": "mlp_in"},
        {"pattern": r"mlp\.fc2\.weight$", "group": "mlp_out"},
        {"pattern": r"position_embedding\.weight$", "kind": "embedding"},
    ],
    "notes": "The patch convolution, class and position embeddings are not regressed (the anchor's "
             "value); text_projection/visual_projection are group other. CLIPModel's text and vision "
             "layers with the same index share a block.",
}
