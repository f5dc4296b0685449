"""The one tokenization every stage shares: prompt + response + end-of-text, loss on the response.

Prompt and response are tokenized separately and concatenated, so the boundary between them is
exact whatever the tokenizer merges across it; the loss mask is then just `position >= n_prompt`.
Reference training, trajectories and target fine-tuning all call `tokenize_batch` (or read its
output from the ingest stage) — there is no second copy of this logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # label value torch's cross-entropy skips (prompt tokens, padding)


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    n_prompt: list[int]
    truncated: list[bool]
    errors: list[str | None]  # None, or why the row is rejected ("overlong: ...")


def tokenize_batch(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int,
                   overlong: str = "truncate") -> Tokenized:
    """Token ids of `prompt + response + eos`, at most `max_length` long.

    overlong='truncate' cuts the response (and then drops the eos: the answer did not end);
    overlong='reject' reports the row. A prompt that leaves no room for one response token is
    rejected either way, since it would contribute no loss at all.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (S2L needs end-of-text)")
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out = Tokenized([], [], [], [])
    for p, r in zip(p_ids, r_ids):
        ids = [*p, *r, eos]
        cut = False
        err = None
        if not r:
            err = "empty_response: the response has no tokens"
        elif len(p) >= max_length:
            err = f"overlong: prompt alone is {len(p)} tokens, max_length is {max_length}"
        elif len(ids) > max_length:
            if overlong == "reject":
                err = f"overlong: {len(ids)} tokens > max_length {max_length}"
            else:
                ids = ids[:max_length]
                cut = True
        out.input_ids.append([] if err else ids)
        out.n_prompt.append(len(p))
        out.truncated.append(cut)
        out.errors.append(err)
    return out


def labels_for(input_ids: list[int], n_prompt: int) -> list[int]:
    """Causal-LM labels: the ids themselves on response tokens, IGNORE_INDEX on the prompt."""
    return [IGNORE_INDEX] * n_prompt + list(input_ids[n_prompt:])


def pad_batch(rows: list[list[int]], n_prompt: list[int], pad_id: int,
              pad_to_multiple: int = 8) -> tuple[Any, Any, Any]:
    """Right-pad a batch. Returns torch tensors input_ids, attention_mask, labels, each (B, L).

    L is rounded up to a multiple of 8 so tensor-core friendly shapes repeat across batches.
    """
    import torch

    longest = max(len(r) for r in rows)
    length = -(-longest // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (r, npr) in enumerate(zip(rows, n_prompt)):
        n = len(r)
        ids[i, :n] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, npr:n] = ids[i, npr:n]
    return ids, mask, labels
