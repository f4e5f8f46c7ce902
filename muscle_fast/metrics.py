"""Model-update compatibility metrics of MUSCLE (Echterhoff et al., 2024, arXiv 2407.09435).

An *old* model (Mv1) is replaced by a *new* one (Mv2), optionally by a *compatible* one (Mv2C,
the new base with the MUSCLE compatibility adapter). Per instance i:

Discriminative (correct_i in {0, 1}, pred_i the chosen answer)::

    acc     = mean(correct)
    NFR     = mean(old_correct & ~new_correct)            # negative flips
    PFR     = mean(~old_correct & new_correct)            # positive flips
    NFR_mc  = mean(~new_correct & (new_pred != old_pred))  # inconsistency flips

Generative (any per-instance score S, e.g. ROUGE-1 or exact match, D = S_new - S_old)::

    PFR = mean(D > 0)          NFR = mean(D < 0)
    m_g = mean(D[D > 0])       # mean gain over positive flips, 0 if there is none
    m_r = mean(-D[D < 0])      # mean regression over negative flips, a magnitude >= 0, 0 if none

With 0/1 scores both definitions give the same NFR and PFR.

Compatibility deltas of Mv2C against the plain update Mv2 (the paper's tables)::

    NFR_c    = NFR(old, compat)
    dNFR_c   = NFR_c - NFR
    d%NFR_c  = dNFR_c / NFR    # 0 when NFR == NFR_c == 0, +inf when NFR == 0 < NFR_c
    dacc_c   = acc_c - acc_new
    dm_g     = m_g(old, compat) - m_g(old, new)
    dm_r     = m_r(old, compat) - m_r(old, new)

All rates are fractions in [0, 1] (multiply by 100 for the paper's percentages). Inputs may be
lists, numpy arrays or tensors; results are Python floats. No result is ever NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "CompatDeltas",
    "DiscriminativeFlips",
    "GenerativeFlips",
    "compat_deltas",
    "discriminative_flips",
    "generative_flips",
    "mc_loglikelihoods",
    "mc_predict",
    "relative_change",
    "rouge1",
]


def _as_1d(x: Any, name: str, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per instance), got shape {a.shape}")
    if a.dtype == object:
        raise TypeError(f"{name} must be numeric, got non-numeric values")
    a = a.astype(dtype)
    if dtype == np.float64 and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _as_bool(x: Any, name: str) -> np.ndarray:
    a = _as_1d(x, name)
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must hold 0/1 (or bool) correctness values")
    return a.astype(bool)


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have one value per instance, got lengths {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("no instances: the metrics are undefined on an empty set")
    return n


def _mean(mask: np.ndarray) -> float:
    return float(mask.mean())


@dataclass(frozen=True)
class DiscriminativeFlips:
    """Flip statistics of one update old -> new on 0/1 correctness. Rates are fractions."""

    n: int
    acc_old: float
    acc_new: float
    nfr: float
    pfr: float
    nfr_mc: float | None  # None when predictions were not given
    n_negative: int
    n_positive: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerativeFlips:
    """Flip statistics of one update old -> new on a per-instance score S (D = S_new - S_old)."""

    n: int
    score_old: float
    score_new: float
    pfr: float
    nfr: float
    m_g: float
    m_r: float
    n_negative: int
    n_positive: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CompatDeltas:
    """How the compatible model Mv2C changes the update, relative to the plain Mv2."""

    nfr_c: float
    dnfr_c: float
    dpct_nfr_c: float  # dnfr_c / nfr; 0.0 if both are 0, math.inf if nfr == 0 < nfr_c
    dacc_c: float
    dm_g: float
    dm_r: float

    def as_dict(self) -> dict:
        return asdict(self)


def discriminative_flips(
    old_correct: Any,
    new_correct: Any,
    old_pred: Sequence[Any] | None = None,
    new_pred: Sequence[Any] | None = None,
) -> DiscriminativeFlips:
    """``NFR = mean(old_correct & ~new_correct)``, ``PFR = mean(~old_correct & new_correct)``.

    Args:
        old_correct, new_correct: 0/1 or bool per instance, aligned.
        old_pred, new_pred: the answer each model chose (ints, strings, any comparable), aligned;
            both or neither. With them ``NFR_mc = mean(~new_correct & (new_pred != old_pred))``.

    Returns:
        DiscriminativeFlips (rates as fractions; ``nfr_mc`` None without predictions).
    """
    o = _as_bool(old_correct, "old_correct")
    w = _as_bool(new_correct, "new_correct")
    n = _same_length(old_correct=o, new_correct=w)
    neg = o & ~w
    pos = ~o & w
    nfr_mc = None
    if (old_pred is None) != (new_pred is None):
        raise ValueError("give both old_pred and new_pred, or neither")
    if old_pred is not None:
        op, np_ = list(_listify(old_pred)), list(_listify(new_pred))
        if len(op) != n or len(np_) != n:
            raise ValueError(f"old_pred/new_pred need {n} values, got {len(op)} and {len(np_)}")
        differs = np.array([a != b for a, b in zip(op, np_)], dtype=bool)
        nfr_mc = _mean(~w & differs)
    return DiscriminativeFlips(
        n=n,
        acc_old=_mean(o),
        acc_new=_mean(w),
        nfr=_mean(neg),
        pfr=_mean(pos),
        nfr_mc=nfr_mc,
        n_negative=int(neg.sum()),
        n_positive=int(pos.sum()),
    )


def _listify(x: Any) -> list:
    if hasattr(x, "detach"):
        x = x.detach().cpu().tolist()
    elif isinstance(x, np.ndarray):
        x = x.tolist()
    return list(x)


def generative_flips(old_scores: Any, new_scores: Any) -> GenerativeFlips:
    """``D = new - old``; ``PFR = mean(D > 0)``, ``NFR = mean(D < 0)``, ``m_g = mean(D[D > 0])``,
    ``m_r = mean(-D[D < 0])``.

    Args:
        old_scores, new_scores: a finite per-instance score (e.g. ROUGE-1 F1 or exact match in
            [0, 1]) per instance, aligned.

    Returns:
        GenerativeFlips. ``m_g`` / ``m_r`` are 0.0 when there is no positive / negative flip;
        ``m_r`` is a magnitude (>= 0), as the paper reports it.
    """
    o = _as_1d(old_scores, "old_scores")
    w = _as_1d(new_scores, "new_scores")
    n = _same_length(old_scores=o, new_scores=w)
    d = w - o
    pos, neg = d > 0, d < 0
    return GenerativeFlips(
        n=n,
        score_old=float(o.mean()),
        score_new=float(w.mean()),
        pfr=_mean(pos),
        nfr=_mean(neg),
        m_g=float(d[pos].mean()) if pos.any() else 0.0,
        m_r=float(-d[neg].mean()) if neg.any() else 0.0,
        n_negative=int(neg.sum()),
        n_positive=int(pos.sum()),
    )


def relative_change(delta: float, base: float) -> float:
    """``delta / base``, defined at ``base == 0``: 0.0 if ``delta == 0``, else ``copysign(inf)``."""
    if base != 0:
        return delta / base
    if delta == 0:
        return 0.0
    return math.copysign(math.inf, delta)


def compat_deltas(old_scores: Any, new_scores: Any, compat_scores: Any) -> CompatDeltas:
    """Paper's compatibility columns for Mv2C, from three aligned per-instance score vectors.

    ``NFR_c = mean(compat < old)``, ``dNFR_c = NFR_c - NFR``, ``d%NFR_c = dNFR_c / NFR`` (see
    :func:`relative_change` for NFR == 0), ``dacc_c = mean(compat) - mean(new)``,
    ``dm_g = m_g(old, compat) - m_g(old, new)``, ``dm_r = m_r(old, compat) - m_r(old, new)``.
    With 0/1 scores, ``mean`` is the accuracy and ``compat < old`` is a negative flip.
    """
    upd = generative_flips(old_scores, new_scores)
    cmp = generative_flips(old_scores, compat_scores)
    dnfr = cmp.nfr - upd.nfr
    return CompatDeltas(
        nfr_c=cmp.nfr,
        dnfr_c=dnfr,
        dpct_nfr_c=relative_change(dnfr, upd.nfr),
        dacc_c=cmp.score_new - upd.score_new,
        dm_g=cmp.m_g - upd.m_g,
        dm_r=cmp.m_r - upd.m_r,
    )


def rouge1(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False
) -> list:
    """ROUGE-1 F1 per instance, from Google's ``rouge-score`` package (its default tokenizer:
    lowercase, alphanumeric tokens). ``[rouge_scorer.RougeScorer(["rouge1"]).score(r, p)
    ["rouge1"].fmeasure for p, r in zip(predictions, references)]``."""
    from rouge_score import rouge_scorer

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} vs {len(references)}"
        )
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=use_stemmer)
    return [
        scorer.score(str(r), str(p))["rouge1"].fmeasure for p, r in zip(predictions, references)
    ]


def mc_loglikelihoods(
    model,
    tokenizer,
    contexts: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 8,
):
    """Sum of log p(choice tokens | context) under a causal LM, for every choice of every item.

    ``ll[d, c] = sum_t log_softmax(model(ctx_d + choice_dc).logits)[t-1, tok_t]`` over the
    choice's tokens t. The context is tokenized with the tokenizer's special tokens (BOS), each
    choice without, so a choice's text should carry its own leading space (" Paris"). Runs under
    ``torch.no_grad()`` in eval mode (the model's mode is restored), in batches of
    ``batch_size`` (context, choice) pairs, right-padded; works for any model whose forward takes
    ``input_ids`` and ``attention_mask`` and returns ``.logits`` (transformers, peft-wrapped).

    Args:
        contexts: D prompt strings.
        choices: D lists of candidate continuations (their counts may differ).

    Returns:
        ``(loglik, n_tokens)``: float64 ``[D, C_max]`` (``-inf`` where item d has fewer choices)
        and int64 ``[D, C_max]`` token counts (0 there). Feed them to :func:`mc_predict`.
    """
    import torch

    if len(contexts) != len(choices):
        raise ValueError(f"{len(contexts)} contexts but {len(choices)} choice lists")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = []
    for d, (ctx, chs) in enumerate(zip(contexts, choices)):
        if len(chs) == 0:
            raise ValueError(f"item {d} has no choices")
        ctx_ids = tokenizer(ctx, add_special_tokens=True)["input_ids"]
        for c, ch in enumerate(chs):
            cont_ids = tokenizer(ch, add_special_tokens=False)["input_ids"]
            if len(cont_ids) == 0:
                raise ValueError(f"choice {c} of item {d} ({ch!r}) tokenizes to nothing")
            if len(ctx_ids) == 0:
                raise ValueError(f"context of item {d} tokenizes to nothing and there is no BOS")
            pairs.append((d, c, list(ctx_ids), list(cont_ids)))

    n_docs, c_max = len(contexts), max(len(c) for c in choices)
    loglik = torch.full((n_docs, c_max), -math.inf, dtype=torch.float64)
    n_tokens = torch.zeros((n_docs, c_max), dtype=torch.int64)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                batch = pairs[start : start + batch_size]
                seqs = [ctx + cont for _, _, ctx, cont in batch]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for r, s in enumerate(seqs):
                    ids[r, : len(s)] = torch.tensor(s)
                    attn[r, : len(s)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                for r, (d, c, ctx, cont) in enumerate(batch):
                    # logits at position t predict token t+1
                    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=logp.device)
                    tgt = torch.tensor(cont, device=logp.device)
                    loglik[d, c] = logp[r, pos, tgt].double().sum().cpu()
                    n_tokens[d, c] = len(cont)
    finally:
        model.train(was_training)
    return loglik, n_tokens


def mc_predict(loglik, n_tokens=None, normalize: bool = False):
    """``argmax(loglik, -1)``, or ``argmax(loglik / n_tokens, -1)`` with ``normalize=True`` (the
    per-token length-normalised variant). Ties go to the lowest index. Returns int64 ``[D]``."""
    import torch

    loglik = torch.as_tensor(loglik, dtype=torch.float64)
    if normalize:
        if n_tokens is None:
            raise ValueError("normalize=True needs n_tokens")
        n = torch.as_tensor(n_tokens, dtype=torch.float64)
        if n.shape != loglik.shape:
            raise ValueError(
                f"n_tokens shape {tuple(n.shape)} != loglik shape {tuple(loglik.shape)}"
            )
        # padded slots (n == 0, loglik == -inf) stay -inf
        loglik = torch.where(n > 0, loglik / n.clamp(min=1), loglik)
    return torch.argmax(loglik, dim=-1)
