"""Turn the step's last-position logits into next tokens, each row by its own request's rules."""

from __future__ import annotations

import torch

from .grammar import TokenMasks, allowed_tokens
from .sequence import Sequence, TokenLogprob


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    masks: TokenMasks | None = None,
    eos_token_ids: frozenset[int] = frozenset(),
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V], one row per sequence. Returns next token ids and (if asked) their logprobs.

    Logprobs are those of the model's raw distribution (before penalties, biases, grammar and
    temperature), as vLLM reports them by default. `masks` holds the allowed tokens of the
    constrained rows only; `eos_token_ids` are masked, with stop_token_ids, until min_tokens.
    """
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, -1) if any(s.params.logprobs is not None for s in seqs) else None
    if any(s.params.changes_logits for s in seqs):
        logits = logits.clone()
        for row, seq in enumerate(seqs):
            if seq.params.changes_logits:
                _process_row(logits[row], seq, eos_token_ids)
    if masks is not None:
        logits = _apply_masks(logits, seqs, masks)
    tokens = [_pick(logits[row], seq) for row, seq in enumerate(seqs)]
    if raw_logprobs is None:
        return tokens, [None] * len(seqs)
    return tokens, [
        _logprob(raw_logprobs[row], tok, seq.params.logprobs) if seq.params.logprobs is not None else None
        for row, (tok, seq) in enumerate(zip(tokens, seqs))
    ]


def non_finite_rows(logits: torch.Tensor) -> list[int]:
    """The rows of logits [B, V] holding a NaN or an infinity: one check for the whole tensor, and
    per-row work only when it fails (an adapter whose weights overflow the activations)."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return []
    return (~finite.all(-1)).nonzero()[:, 0].tolist()


def prompt_logprobs(logits: torch.Tensor, target_ids: list[int], top_n: int) -> list[TokenLogprob]:
    """logits: [K, V], row k predicting prompt token target_ids[k]. Each target's logprob given the
    tokens before it (raw distribution, as for sampled tokens) and the top_n alternatives."""
    logprobs = torch.log_softmax(logits.float(), -1)  # [K, V]
    targets = torch.tensor(target_ids, dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()  # [K]
    if not top_n:
        return [TokenLogprob(t, v, []) for t, v in zip(target_ids, chosen)]
    top = torch.topk(logprobs, top_n)  # [K, top_n]
    return [
        TokenLogprob(t, v, list(zip(ids, values)))
        for t, v, ids, values in zip(target_ids, chosen, top.indices.tolist(), top.values.tolist())
    ]


def _process_row(row: torch.Tensor, seq: Sequence, eos_token_ids: frozenset[int]) -> None:
    """Penalties, then logit_bias, then min_tokens' mask, in place. Token ids were checked against
    the vocabulary when the request was accepted."""
    params = seq.params
    if params.has_penalties:
        _apply_penalties(row, seq)
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=row.device)
        row[ids] += torch.tensor(list(params.logit_bias.values()), dtype=row.dtype, device=row.device)
    if len(seq.output_token_ids) < params.min_tokens:
        ended = sorted(eos_token_ids.union(params.stop_token_ids))
        row[torch.tensor(ended, dtype=torch.long, device=row.device)] = float("-inf")


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """OpenAI presence/frequency penalties over output tokens; HF/vLLM repetition penalty over all."""
    params = seq.params
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.all_token_ids)), dtype=torch.long, device=row.device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if seq.output_token_ids and (params.presence_penalty or params.frequency_penalty):
        output_ids = torch.tensor(seq.output_token_ids, device=row.device)
        counts = torch.bincount(output_ids, minlength=row.numel()).to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)


def _apply_masks(logits: torch.Tensor, seqs: list[Sequence], masks: TokenMasks) -> torch.Tensor:
    """Disallowed tokens of the constrained rows to -inf; other rows untouched."""
    rows = [row for row, seq in enumerate(seqs) if seq.seq_id in masks.rows]
    mask_rows = [masks.rows[seqs[row].seq_id] for row in rows]
    allowed = allowed_tokens(masks.bitmask[mask_rows], logits.shape[1]).to(logits.device)  # [K, V]
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


def _pick(row: torch.Tensor, seq: Sequence) -> int:
    params = seq.params
    if params.is_greedy:
        return int(row.argmax())
    row = row / params.temperature
    if params.top_k > 0 and params.top_k < row.numel():
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, -1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keep the smallest set reaching top_p
        probs = probs.index_fill(0, order[drop], 0.0)
    if params.min_p > 0.0:  # after top_k and top_p, as vLLM orders them; the top token always stays
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    # Exponential race (argmax p/E) equals sampling from p; with a per-request generator, a seed
    # gives the same tokens whatever else shares the batch. Drawn on the host: that generator is a CPU one.
    noise = torch.empty(probs.shape, dtype=probs.dtype).exponential_(generator=seq.generator).to(probs.device)
    return int((probs / noise).argmax())


def _logprob(row: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    top = torch.topk(row, top_n) if top_n else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(token, float(row[token]), alternatives)
