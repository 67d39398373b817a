"""BERT-style encoders (BERT, RoBERTa, XLM-R, ELECTRA)."""

RULES = [
    {"pattern": r"attention\.self\.(query|key|value)\.weight$", "group": "attn_in"},
    {"pattern": r"attention\.output\.dense\.weight$", "group": "attn_out"},
    {"pattern": r"intermediate\.dense\.weight$", "group": "mlp_in"},
    {"pattern": r"(?<!attention\.)output\.dense\.weight$", "group": "mlp_out"},
]

ARCHITECTURE = {
    "model_types": ["bert", "roberta", "xlm-roberta", "electra"],
    "rules": RULES,
    "notes": "The pooler and heads outside the layers are group other (the config's rho, never searched).",
}
