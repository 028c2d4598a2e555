"""Evaluation: loss and perplexity over the targets, and the task metric (accuracy, or exact match by generating).

Each process scores every num_processes-th example and the sums are added across processes, so the numbers
are the same with one process or many.
"""

from __future__ import annotations

import json
import math

import torch

from deltatune.data import collate, prompt_and_reference
from deltatune.data.demo_task import json_exact_match
from deltatune.trainer.examples import EvalSet
from deltatune.trainer.generation import generate_answers
from deltatune.trainer.loss import forward_loss


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after trimming whitespace; when both are a JSON object and nothing else, equal as values (key order and
    spacing aside). Text around an object counts: 'No. {"a": 1}' does not match 'Yes. {"a": 1}'."""
    if _is_json_object(reference) and _is_json_object(prediction):
        return json_exact_match(prediction, reference)
    return prediction.strip() == reference.strip()


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _batches(indices: list[int], size: int):
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


@torch.no_grad()
def evaluate(model, eval_set: EvalSet, tokenizer, accelerator, *, batch_size: int, generate: bool = False,
             max_new_tokens: int = 64, max_length: int | None = None) -> dict[str, float]:
    """eval_loss, perplexity, and accuracy (classification) or exact_match (with `generate`; prompts cut to fit
    `max_length` with the answer, see generate_answers)."""
    was_training = model.training
    model.eval()
    mine = list(range(accelerator.process_index, len(eval_set.examples), accelerator.num_processes))
    classify = bool(eval_set.label_names)
    # loss sum, target count, correct answers, scored answers
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    for chunk in _batches(mine, batch_size):
        batch = collate([eval_set.examples[i] for i in chunk], tokenizer.pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            total, count, logits = forward_loss(model, batch)
        totals[0] += total.double()
        totals[1] += count
        if classify:
            totals[2] += (logits.argmax(-1) == batch["labels"]).sum()
            totals[3] += len(chunk)
    generating = generate and not classify and eval_set.format != "text"  # text rows have no reference answer
    if generating:  # by rows, not examples: tokenizing may have left rows out
        rows = list(range(accelerator.process_index, len(eval_set.rows), accelerator.num_processes))
        for chunk in _batches(rows, batch_size):
            pairs = [prompt_and_reference(eval_set.rows[i], eval_set.format) for i in chunk]
            with accelerator.autocast():
                predictions = generate_answers(model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens,
                                               max_length)
            totals[2] += sum(exact_match(p, ref) for p, (_, ref) in zip(predictions, pairs, strict=True))
            totals[3] += len(chunk)
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    loss = (totals[0] / totals[1]).item() if totals[1] else float("nan")
    metrics = {"eval_loss": loss, "perplexity": math.exp(min(loss, 700)) if loss == loss else float("nan")}
    if classify:
        metrics["accuracy"] = (totals[2] / totals[3]).item()
    elif generating:
        metrics["exact_match"] = (totals[2] / totals[3]).item()
    return metrics
