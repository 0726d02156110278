"""Turning ragged token lists into padded tensors, forward chunks within a token budget, and minibatch indices."""

from __future__ import annotations

import torch


def pad_left(seqs: list[torch.Tensor], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D long tensors. -> (ids [B, L], attention_mask [B, L]); L is rounded up to `multiple`."""
    length = round_up(max(len(s) for s in seqs), multiple)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long, device=seqs[0].device)
    mask = torch.zeros((len(seqs), length), dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, length - len(s):] = s
            mask[i, length - len(s):] = 1
    return ids, mask


def pad_right(seqs: list[torch.Tensor], pad_id: int, multiple: int = 1) -> torch.Tensor:
    """Right-pad 1-D long tensors. -> ids [B, L]; L is rounded up to `multiple`."""
    length = round_up(max(len(s) for s in seqs), multiple)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
    return ids


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens (left padding gets 0). [B, L] -> [B, L]."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def unique_sequences(seqs: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Distinct sequences in first-seen order and, for each input, the index of its distinct sequence."""
    index: dict[tuple[int, ...], int] = {}
    inverse = [index.setdefault(s, len(index)) for s in seqs]
    return list(index), inverse


def token_budget_chunks(lengths: list[int], max_tokens: int | None, multiple: int = 1) -> list[list[int]]:
    """Group sample indices into forward chunks, longest first, so that a chunk's padded size
    (samples x round_up(longest, multiple)) stays within max_tokens (a single over-long sample gets its own chunk).
    max_tokens=None puts everything in one chunk."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if max_tokens is None:
        return [order] if order else []
    chunks: list[list[int]] = []
    for i in order:
        if chunks:
            longest = round_up(lengths[chunks[-1][0]], multiple)
            if (len(chunks[-1]) + 1) * longest <= max_tokens:
                chunks[-1].append(i)
                continue
        chunks.append([i])
    return chunks


def backward_batches(batch_size: int, mini_batch_size: int, gradient_accumulation_steps: int,
                     generator: torch.Generator | None = None) -> list[list[torch.Tensor]]:
    """One epoch's shuffled indices: a list of optimiser steps, each a list of micro-batch index tensors."""
    perm = torch.randperm(batch_size, generator=generator)
    step_size = mini_batch_size * gradient_accumulation_steps
    return [list(perm[start:start + step_size].split(mini_batch_size))
            for start in range(0, batch_size, step_size)]
