"""Turn the step's last-position logits into next tokens, each row by its own request's rules.

The step's tokens reach the host in one copy: greedy rows take one argmax over the batch, sampled
rows their own filters and an exponential race, all on the logits' device. Seeded rows draw their
noise there too, from a counter-based hash of (seed, output position, token id): the same seed gives
the same tokens whatever else shares the batch, on any device, with no generator state to carry.
"""

from __future__ import annotations

import torch

from .grammar import TokenMasks, allowed_tokens
from .sequence import Sequence, TokenLogprob

MASK32 = 0xFFFFFFFF


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
    token_ids = _pick(logits, seqs)  # [B] on the device
    if raw_logprobs is None:
        return token_ids.tolist(), [None] * len(seqs)  # the step's one copy to the host
    return _with_logprobs(raw_logprobs, token_ids, seqs)


def _with_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, seqs: list[Sequence]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Tokens, their logprobs and the asked-for alternatives, copied to the host once each."""
    chosen = raw_logprobs.gather(1, token_ids[:, None])[:, 0]  # [B]
    top_n = max(seq.params.logprobs for seq in seqs if seq.params.logprobs is not None)
    top = torch.topk(raw_logprobs, top_n) if top_n else None  # [B, top_n]
    tokens, values = token_ids.tolist(), chosen.tolist()
    top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    out: list[TokenLogprob | None] = []
    for row, seq in enumerate(seqs):
        n = seq.params.logprobs
        alternatives = list(zip(top_ids[row][:n], top_values[row][:n])) if n else []
        out.append(None if n is None else TokenLogprob(tokens[row], values[row], alternatives))
    return tokens, out


def non_finite_rows(logits: torch.Tensor) -> list[int]:
    """The rows of logits [B, V] holding a NaN or an infinity: one sum for the whole tensor (a NaN or
    an infinity anywhere makes it one; 20 us against 100 for isfinite on one row of the default
    model), and per-row work only when it fails (an adapter whose weights overflow the activations,
    or finite logits whose sum overflows)."""
    if bool(torch.isfinite(logits.sum())):
        return []
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


def _pick(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Each row's next token [B] (long, on the logits' device), with no host sync: one argmax over
    the batch for greedy rows, each sampled row's own filters and an exponential race."""
    token_ids = logits.argmax(-1)  # [B]: the greedy rows' answer; sampled rows are overwritten
    sampled = [row for row, seq in enumerate(seqs) if not seq.params.is_greedy]
    if not sampled:
        return token_ids
    probs = torch.stack([_filtered_probs(logits[row], seqs[row].params) for row in sampled])  # [S, V]
    # Exponential race (argmax p/E) equals sampling from p.
    noise = _exponential_noise([seqs[row] for row in sampled], logits.shape[1], logits.device)  # [S, V]
    token_ids[torch.tensor(sampled, device=logits.device)] = (probs / noise).argmax(-1)
    return token_ids


def _filtered_probs(row: torch.Tensor, params) -> torch.Tensor:
    """Temperature, top_k, top_p then min_p (as vLLM orders them) on one row's logits, as probabilities."""
    row = row / params.temperature
    if params.top_k > 0 and params.top_k < row.numel():
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, -1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keep the smallest set reaching top_p
        probs = probs.index_fill(0, order[drop], 0.0)
    if params.min_p > 0.0:  # the top token always stays
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs


def _exponential_noise(seqs: list[Sequence], vocab: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [S, V] on `device`: seeded rows from `seeded_uniform` (a seed's k-th output token
    draws the same noise on any device, in any batch), the others from the device's own generator."""
    noise = torch.empty(len(seqs), vocab, device=device).exponential_()
    seeded = [i for i, seq in enumerate(seqs) if seq.params.seed is not None]
    if seeded:
        seeds = [seqs[i].params.seed for i in seeded]
        counters = [len(seqs[i].output_token_ids) for i in seeded]
        uniform = seeded_uniform(seeds, counters, vocab, device)  # [s, V] float64 in (0, 1)
        noise[torch.tensor(seeded, device=device)] = (-torch.log(uniform)).float()
    return noise


def seeded_uniform(seeds: list[int], counters: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """U(0, 1) [S, V] float64 as a pure function of (seed, counter, token id): a 32-bit integer hash
    (multiply-xorshift rounds, constants below 2^31 so no int64 product overflows), 24 bits of it as
    an exact float. Integer ops give the same bits on every device."""
    seed = torch.tensor(seeds, dtype=torch.int64).to(device, non_blocking=True)
    counter = torch.tensor(counters, dtype=torch.int64).to(device, non_blocking=True)
    key = _mix(_mix(_mix(seed & MASK32) ^ ((seed >> 32) & MASK32)) ^ counter)  # [S]
    token = torch.arange(vocab, dtype=torch.int64, device=device)
    bits = _mix(_mix((key[:, None] + token * 0x61C88647) & MASK32) ^ key[:, None])  # [S, V]
    return ((bits >> 8).double() + 0.5) / 2**24


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche (xorshift-multiply rounds, murmur3's finaliser's shape) of x in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & MASK32
    return x ^ (x >> 16)
