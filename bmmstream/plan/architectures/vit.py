"""ViT (ViTModel, ViTForImageClassification)."""
from bmmstream.plan.architectures.bert import RULES

ARCHITECTURE = {
    "model_types": ["vit"],
    # checkpoints hold encoder.layer.N.attention.attention.{query,key,value}; BERT's output rules fit
    "rules": [{"pattern": r"attention\.attention\.(query|key|value)\.weight$", "group": "attn_in"}] + RULES,
    "notes": "Patch projection, CLS token and position embeddings are not regressed; the pooler is group other.",
}
