"""Scoring a loaded model on a task: encoder accuracy with a task head, label likelihood, perplexity.

These are the scores the benchmark and the hyperparameter search compare merged models by. They
take an already loaded torch model (no file I/O) so a caller can evaluate an in-memory merge as
easily as a folder on disk.

- Encoder tasks: a sentence embedding is the attention-mask-weighted mean of the last hidden states
  (the all-MiniLM-L6-v2 pooling); a linear head per task maps it to label logits. Heads are never merged.
- Decoder tasks: each row is a prompt, a list of short answer choices and the right answer. A choice's
  score is the summed log-probability of its answer tokens after the prompt (teacher forced); the
  prediction is the highest-scoring choice. Prompt and answer are tokenized separately and the ids
  concatenated, exactly as the experts were trained.
"""
from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch


# ----------------------------------------------------------------------------------------------
# encoder tasks
# ----------------------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` [B, L, H] over the positions where `mask` [B, L] is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def encoder_logits(model: torch.nn.Module, head: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Label logits [B, C] for one tokenized batch (input_ids, attention_mask[, token_type_ids])."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    hidden = model(**inputs).last_hidden_state
    pooled = mean_pool(hidden, batch["attention_mask"])
    return head(pooled.to(next(head.parameters()).dtype))


@torch.no_grad()
def encoder_correct(model: torch.nn.Module, head: torch.nn.Module, batches: Iterable[dict]) -> list[int]:
    """Per example, 1 if its argmax head logit equals `batch['labels']`, else 0 (in batch order):
    the rows a search's bootstrap noise guard resamples."""
    was_training = model.training
    model.eval()
    correct: list[int] = []
    try:
        for batch in batches:
            pred = encoder_logits(model, head, batch).argmax(-1)
            correct += (pred == batch["labels"]).to(torch.int64).flatten().tolist()
    finally:
        model.train(was_training)
    if not correct:
        raise ValueError("encoder_accuracy: no examples")
    return correct


@torch.no_grad()
def encoder_predictions(model: torch.nn.Module, head: torch.nn.Module, batches: Iterable[dict]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Head logits (N, C) and labels (N,) of every example: what posterior sampling averages."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in batches:
            logits.append(encoder_logits(model, head, batch).float().cpu())
            labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def encoder_accuracy(model: torch.nn.Module, head: torch.nn.Module, batches: Iterable[dict]) -> float:
    """Fraction of examples whose argmax head logit equals `batch['labels']`."""
    correct = encoder_correct(model, head, batches)
    return sum(correct) / len(correct)


def encoder_batches(
    tokenizer: Any,
    rows: Sequence[dict],
    labels: Sequence[str],
    *,
    max_len: int = 128,
    batch_size: int = 32,
) -> list[dict]:
    """Tokenize rows {text, label} into padded batches with integer `labels` (index into `labels`)."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer(
            [r["text"] for r in chunk],
            truncation=True,
            max_length=max_len,
            padding=True,
            return_tensors="pt",
        )
        batch = dict(enc)
        batch["labels"] = torch.tensor([index[r["label"]] for r in chunk])
        out.append(batch)
    return out


def linear_head(weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Linear:
    """A torch Linear holding a saved task head (weight [C, H], bias [C])."""
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


# ----------------------------------------------------------------------------------------------
# decoder tasks
# ----------------------------------------------------------------------------------------------
def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (bf16/fp16 log-softmax is too coarse to rank choices)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _forward_params(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _cache_of(res: Any) -> Any:
    """The KV cache a forward returned (`cache` from transformers 5.x, `past_key_values` before)."""
    return res["cache"] if "cache" in res else res.past_key_values


@torch.no_grad()
def choice_logprobs(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]]
) -> list[list[float]]:
    """Summed log-probability of each choice's tokens after its prompt, for a batch of prompts.

    One right-padded forward over the batch's prompts (causal attention: padding after a prompt
    cannot change its logits; logits only at each prompt's last position where the model allows it)
    gives every choice's first token. When some choice is longer, that forward keeps its KV cache,
    and the j-th choices of all rows continue from a copy of it in one batched forward over their
    remaining tokens (the padded prompt slots masked out, positions counted from each prompt's end).
    """
    device = _device(model)
    prompt_ids = [_ids(tokenizer, p) for p in prompts]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("choice_logprobs: empty prompt")
    choice_ids = [[_ids(tokenizer, c) for c in row] for row in choices]
    for row, ids_row in zip(choices, choice_ids):
        for c, ids_c in zip(row, ids_row):
            if not ids_c:
                raise ValueError(f"choice_logprobs: choice {c!r} tokenizes to nothing")
    n = len(prompts)
    if n == 0:
        return []
    lens = [len(p) for p in prompt_ids]
    ids = torch.zeros(n, max(lens), dtype=torch.long)
    mask = torch.zeros(n, max(lens), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    ids, mask = ids.to(device), mask.to(device)
    longer = any(len(c) > 1 for row in choice_ids for c in row)
    last = [n_i - 1 for n_i in lens]
    params = _forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"
    kw: dict[str, Any] = {}
    col = last
    # the LM head over every prompt position costs as much as the rest of a small model's forward, and
    # only each prompt's last position is read: logits there only, where the model takes positions
    if "logits_to_keep" in params:
        keep = sorted(set(last))
        kw["logits_to_keep"] = torch.tensor(keep, device=device)
        col = [keep.index(t) for t in last]
    res = model(input_ids=ids, attention_mask=mask, use_cache=longer, **kw)
    first_lp = torch.log_softmax(_wide(res.logits[torch.arange(n, device=device), torch.tensor(col, device=device)]),
                                 dim=-1)
    out = [[float(first_lp[i, c[0]]) for c in choice_ids[i]] for i in range(n)]
    if not longer:
        return out
    for j in range(max(len(row) for row in choice_ids)):
        rows = [i for i in range(n) if j < len(choice_ids[i]) and len(choice_ids[i][j]) > 1]
        if not rows:
            continue
        # tokens c[1:] are predicted from positions holding c[:-1], after each row's cached prompt
        width = max(len(choice_ids[i][j]) - 1 for i in rows)
        cont = torch.zeros(n, width, dtype=torch.long)
        cmask = torch.zeros(n, width, dtype=torch.long)
        for i in rows:
            c = choice_ids[i][j][:-1]
            cont[i, : len(c)] = torch.tensor(c)
            cmask[i, : len(c)] = 1
        pos = torch.tensor(lens)[:, None] + torch.arange(width)[None, :]
        r = model(input_ids=cont.to(device), attention_mask=torch.cat([mask, cmask.to(device)], dim=1),
                  position_ids=pos.to(device), use_cache=True, **{cache_kw: copy.deepcopy(_cache_of(res))})
        for i in rows:
            c = choice_ids[i][j]
            lp = torch.log_softmax(_wide(r.logits[i, : len(c) - 1]), dim=-1)
            out[i][j] += float(lp[torch.arange(len(c) - 1, device=device), torch.tensor(c[1:], device=device)].sum())
    return out


def _answer_index(row: dict) -> int:
    answer = row["answer"]
    if isinstance(answer, int):
        return answer
    return list(row["choices"]).index(answer)


def label_likelihood_correct(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 8
) -> list[int]:
    """Per row {prompt, choices, answer}, 1 if its most likely choice is the answer, else 0.

    `answer` is the right choice's text or its index. Ties go to the first choice.
    """
    if not rows:
        raise ValueError("label_likelihood_accuracy: no rows")
    was_training = model.training
    model.eval()
    correct: list[int] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            scores = choice_logprobs(
                model, tokenizer, [r["prompt"] for r in chunk], [r["choices"] for r in chunk]
            )
            for row, s in zip(chunk, scores):
                pred = max(range(len(s)), key=lambda j: (s[j], -j))
                correct.append(int(pred == _answer_index(row)))
    finally:
        model.train(was_training)
    return correct


def label_likelihood_predictions(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choice log-probabilities as logits (N, most choices; -inf where a row has fewer) and answer
    indices (N,): argmax picks what label_likelihood_correct picks (ties to the first choice)."""
    if not rows:
        raise ValueError("label_likelihood_accuracy: no rows")
    was_training = model.training
    model.eval()
    scores: list[list[float]] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            scores += choice_logprobs(model, tokenizer, [r["prompt"] for r in chunk], [r["choices"] for r in chunk])
    finally:
        model.train(was_training)
    width = max(len(s) for s in scores)
    logits = torch.full((len(rows), width), float("-inf"), dtype=torch.float64)
    for i, s in enumerate(scores):
        logits[i, : len(s)] = torch.tensor(s, dtype=torch.float64)
    return logits, torch.tensor([_answer_index(r) for r in rows])


def label_likelihood_accuracy(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict], *, batch_size: int = 8
) -> float:
    """Fraction of rows {prompt, choices, answer} whose most likely choice is the answer."""
    correct = label_likelihood_correct(model, tokenizer, rows, batch_size=batch_size)
    return sum(correct) / len(correct)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, max_len: int = 256) -> float:
    """exp(mean next-token NLL) over all predicted tokens of `texts` (each truncated to max_len)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    nll = 0.0
    count = 0
    try:
        for text in texts:
            ids = _ids(tokenizer, text)[:max_len]
            if len(ids) < 2:
                continue
            seq = torch.tensor([ids], device=device)
            lp = torch.log_softmax(_wide(model(input_ids=seq).logits)[0, :-1], dim=-1)
            nll -= float(lp.gather(1, seq[0, 1:, None]).sum())
            count += len(ids) - 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no text with at least two tokens")
    return math.exp(nll / count)
