"""bmmstream.search.metrics on tiny random models with a word-level tokenizer (no downloads)."""
from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from bmmstream.search import metrics as ev

WORDS = ["[PAD]", "[UNK]", "the", "cat", "dog", "sat", "ran", "on", "mat", "a", "big", "red", "yes", "no",
         "maybe", "very", "good", "bad", "film", "was"]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=32, attn_implementation="eager")
    return BertModel(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


ROWS = [
    {"text": "the cat sat on the mat", "label": "pos"},
    {"text": "a dog ran", "label": "neg"},
    {"text": "the big red dog sat on a mat", "label": "neg"},
    {"text": "good film", "label": "pos"},
    {"text": "the film was very bad", "label": "neg"},
]
LABELS = ["neg", "pos"]


def test_mean_pool_ignores_padding():
    h = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = ev.mean_pool(h, mask)
    torch.testing.assert_close(pooled[0], h[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], h[1].mean(0))


def test_encoder_accuracy_head_rigged_to_one_label(bert, tok):
    head = ev.linear_head(torch.zeros(2, 8), torch.tensor([0.0, 5.0]))  # always "pos"
    batches = ev.encoder_batches(tok, ROWS, LABELS, batch_size=2)
    assert ev.encoder_accuracy(bert, head, batches) == pytest.approx(2 / 5)
    head = ev.linear_head(torch.zeros(2, 8), torch.tensor([5.0, 0.0]))  # always "neg"
    assert ev.encoder_accuracy(bert, head, batches) == pytest.approx(3 / 5)


def test_encoder_accuracy_negated_head_is_complement(bert, tok):
    torch.manual_seed(1)
    w, b = torch.randn(2, 8), torch.randn(2)
    batches = ev.encoder_batches(tok, ROWS, LABELS, batch_size=5)
    acc = ev.encoder_accuracy(bert, ev.linear_head(w, b), batches)
    neg = ev.encoder_accuracy(bert, ev.linear_head(-w, -b), batches)
    assert acc + neg == pytest.approx(1.0)


def test_encoder_logits_do_not_depend_on_batch_padding(bert, tok):
    head = ev.linear_head(torch.randn(2, 8), torch.randn(2))
    together = torch.cat([ev.encoder_logits(bert, head, b) for b in ev.encoder_batches(tok, ROWS, LABELS, batch_size=5)])
    alone = torch.cat([ev.encoder_logits(bert, head, b) for b in ev.encoder_batches(tok, ROWS, LABELS, batch_size=1)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def _manual_logprob(model, tok, prompt: str, choice: str) -> float:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].to(torch.float64)
    total = 0.0
    for j, t in enumerate(c):
        total += float(torch.log_softmax(logits[len(p) - 1 + j], -1)[t])
    return total


DEC_ROWS = [
    {"prompt": "the cat sat on", "choices": ["the mat", "a dog", "maybe"], "answer": "the mat"},
    {"prompt": "was the film good", "choices": ["yes", "no"], "answer": 1},
    {"prompt": "a big red", "choices": ["dog", "cat ran on a mat", "film"], "answer": "film"},
]


def test_choice_logprobs_equal_manual_sum(llama, tok):
    scores = ev.choice_logprobs(llama, tok, [r["prompt"] for r in DEC_ROWS], [r["choices"] for r in DEC_ROWS])
    for row, s in zip(DEC_ROWS, scores):
        expected = [_manual_logprob(llama, tok, row["prompt"], c) for c in row["choices"]]
        assert s == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert all(v < 0 for v in s)


def _tiny_lm(family: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(3)
    common = dict(vocab_size=len(WORDS), attn_implementation=attn)
    if family == "gpt2":
        cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **common)
        return GPT2LMHeadModel(cfg).to(torch.float64).eval()
    kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False, **common)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    return cls[1](cls[0](**kw)).to(torch.float64).eval()


# prompts of different lengths; rows with one-token and longer choices, different numbers of choices,
# and the longer choices at different indices: the batched forwards must equal one forward per choice
MIXED_ROWS = DEC_ROWS + [
    {"prompt": "the film was very very bad", "choices": ["no", "yes"], "answer": 0},
    {"prompt": "dog", "choices": ["maybe", "red mat", "a big red dog", "cat"], "answer": 2},
    {"prompt": "the cat ran on a big red mat", "choices": ["good film", "bad"], "answer": 1},
]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_choice_logprobs_equal_one_forward_per_choice(tok, family, attn):
    model = _tiny_lm(family, attn)
    scores = ev.choice_logprobs(model, tok, [r["prompt"] for r in MIXED_ROWS], [r["choices"] for r in MIXED_ROWS])
    for row, s in zip(MIXED_ROWS, scores):
        expected = [_manual_logprob(model, tok, row["prompt"], c) for c in row["choices"]]
        assert s == pytest.approx(expected, rel=1e-9, abs=1e-9), (family, attn, row)


def test_label_likelihood_accuracy_matches_manual_argmax(llama, tok):
    correct = 0
    for row in DEC_ROWS:
        lps = [_manual_logprob(llama, tok, row["prompt"], c) for c in row["choices"]]
        pred = max(range(len(lps)), key=lambda j: lps[j])
        answer = row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"])
        correct += pred == answer
    for bs in (1, 2, 8):
        assert ev.label_likelihood_accuracy(llama, tok, DEC_ROWS, batch_size=bs) == pytest.approx(correct / 3)


def test_label_likelihood_uniform_model_picks_shortest_then_first(llama, tok):
    # zero LM head: every token has log-prob -log V, so a choice scores -len(tokens) * log V; the
    # shortest choice wins and ties go to the first listed
    uniform = LlamaForCausalLM(llama.config).to(torch.float64).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    rows = [
        {"prompt": "the cat", "choices": ["no", "yes"], "answer": "no"},  # tie -> first: right
        {"prompt": "a film", "choices": ["very good", "bad", "no"], "answer": "no"},  # picks "bad": wrong
        {"prompt": "the dog", "choices": ["a big mat", "red"], "answer": "red"},  # shortest: right
    ]
    scores = ev.choice_logprobs(uniform, tok, [r["prompt"] for r in rows], [r["choices"] for r in rows])
    assert scores[1] == pytest.approx([-2 * math.log(len(WORDS)), -math.log(len(WORDS)), -math.log(len(WORDS))])
    assert ev.label_likelihood_accuracy(uniform, tok, rows) == pytest.approx(2 / 3)


def test_perplexity_of_uniform_model_is_vocab_size(llama, tok):
    uniform = LlamaForCausalLM(llama.config).to(torch.float64).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    assert ev.perplexity(uniform, tok, ["the cat sat on the mat", "a dog"]) == pytest.approx(len(WORDS))


def test_perplexity_equals_manual(llama, tok):
    texts = ["the cat sat on the mat", "a big red dog ran", "yes"]  # the last has no prediction
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            lp = torch.log_softmax(llama(input_ids=torch.tensor([ids])).logits[0], -1)
        nll -= sum(float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        n += len(ids) - 1
    assert ev.perplexity(llama, tok, texts) == pytest.approx(math.exp(nll / n), rel=1e-9)


def test_empty_inputs_raise(llama, tok):
    with pytest.raises(ValueError, match="no rows"):
        ev.label_likelihood_accuracy(llama, tok, [])
    with pytest.raises(ValueError, match="at least two tokens"):
        ev.perplexity(llama, tok, ["yes"])
