"""Gemma, Gemma 2, Gemma 3: Llama-style projections, embeddings tied to the LM head."""
from bmmstream.plan.architectures.llama import ATTENTION, MLP

# Gemma 3's multimodal checkpoint (model_type gemma3) adds a SigLIP vision tower
# (vision_tower[.vision_model].encoder.layers.N.{self_attn.{q,k,v,out}_proj, mlp.fc1, mlp.fc2}); its
# q/k/v match ATTENTION, the rest are named only in the tower
VISION = [
    {"pattern": r"self_attn\.out_proj\.weight$", "group": "attn_out"},
    {"pattern": r"mlp\.fc1\.weight$", "group": "mlp_in"},
    {"pattern": r"mlp\.fc2\.weight$", "group": "mlp_out"},
    {"pattern": r"position_embedding\.weight$", "kind": "embedding"},
    # the projector multiplies x @ W: stored (d_in, d_out)
    {"pattern": r"multi_modal_projector\.mm_input_projection_weight$", "transposed": True},
]

ARCHITECTURE = {
    "model_types": ["gemma", "gemma2", "gemma3_text", "gemma3"],
    "rules": ATTENTION + MLP + VISION,
    "tied_embeddings": True,
    "notes": "lm_head is tied to embed_tokens (usually absent from the checkpoint); both are embeddings "
             "(the anchor's value). gemma3 (multimodal): the SigLIP tower's linears are grouped like CLIP's.",
}
