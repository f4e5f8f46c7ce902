"""Step 1 of the demo: the setting. The vocabulary, the two pre-training corpora, the downstream
task and its splits, and every knob that decides a seed's numbers (``DemoConfig``).

The world is digit operations ``op a b c``. Pre-training text is ``op a b c = r <eos>``; each
base sees the ops of its corpus mix. The downstream task uses a format no base saw,
``Q op a b c A r1 r2``: a two-token answer, ``r1 = op(a, b, c)`` and ``r2 = op(b, c, a)`` (the
same op on the triple rotated once). Its labels are those of a real annotated dataset: on a
share ``label_noise`` of the items an answer token is another digit than the op gives (drawn once
per item and seed, so the same item carries the same label in every split): error that no model
can remove and that training and test items share. Task training learns from every token after
``<bos>``, the context and the answer, as the paper does ("the entire context and answer
tokens")."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

OPS = ("first", "last", "max", "min", "add", "add2")
DIGITS = tuple(str(d) for d in range(10))
SPECIAL = ("<pad>", "<bos>", "<eos>", "=", "Q", "A")
VOCAB = SPECIAL + DIGITS + OPS


def apply_op(op: str, a: int, b: int, c: int) -> int:
    if op == "first":
        return a
    if op == "last":
        return c
    if op == "max":
        return max(a, b, c)
    if op == "min":
        return min(a, b, c)
    if op == "add":
        return (a + b + c) % 10
    if op == "add2":  # ignores c: a 100-entry table
        return (a + b) % 10
    raise ValueError(op)


@dataclass(frozen=True)
class BaseSpec:
    """One pre-trained base: its size, its pre-training steps and its corpus mix (op weights)."""

    hidden: int
    intermediate: int
    steps: int  # a fixed budget; with ``converge_tol``, the most steps the run may take
    mix: tuple  # ((op, weight), ...); ops with weight 0 never occur in the corpus
    layers: int = 2
    heads: int = 4
    # None: train exactly ``steps``. A number: every ``check_every`` steps, measure the loss on a
    # held-out sample of the base's own corpus; stop once it is within ``converge_tol``
    # nats/token of that sample's entropy floor (the loss of a model that knows every op of
    # its mix); keep the checkpoint with the lowest held-out loss.
    converge_tol: float | None = None
    check_every: int = 150
    # with ``converge_tol``: a run not converged after ``steps`` is restarted from a new init,
    # at most this many runs in all (the one with the lowest held-out loss is kept)
    max_runs: int = 1


# Design G (issue 25): the two corpora overlap (first, last, min, add) and each has one op the
# other lacks: v1 keeps ``max``, which v2's corpus drops; v2 adds ``add2``, which v1's lacks. v1
# has a fixed budget; v2 trains until converged on its own corpus.
V1 = BaseSpec(hidden=64, intermediate=192, steps=450,
              mix=(("first", 1.0), ("last", 1.0), ("max", 1.0), ("min", 1.0), ("add", 1.0),
                   ("add2", 0.0)))
V2 = BaseSpec(hidden=64, intermediate=192, steps=1800, converge_tol=0.01, max_runs=2,
              mix=(("first", 1.0), ("last", 1.0), ("max", 0.0), ("min", 1.0), ("add", 1.0),
                   ("add2", 1.0)))

# k of the ``topk`` teacher-cache row: a real cut of the demo's 22-token vocabulary
CACHE_TOPK_K = 4
# MUSCLE trained from a teacher cache (issue 24) built from the same v1/v2 task models over the
# train rows: ``hidden`` is exact (the same loss as the live row), ``topk`` an approximation
CACHE_ROWS = {"muscle_cache_hidden": "hidden", "muscle_cache_topk": "topk"}
# the compatibility rows, in table order; each is trained from the v2 task adapter. The paper's
# Table 7 shape: MUSCLE, its ablations (old_correct, plain KD from v1), the likelihood masks
# with CE, and the controls a sceptic asks for: the same loop with CE only, at the same steps
# and at four times the steps.
COMPAT_ROWS = ("muscle", *CACHE_ROWS, "old_correct", "all_old", "token_likelihood",
               "sequence_likelihood", "ce_control", "ce_control_4x")
ROW_NAMES = {"v1": "v1 (old task model)", "v2": "v2 (new task model)",
             "muscle": "MUSCLE (mask=muscle)",
             "muscle_cache_hidden": "MUSCLE (cache: hidden)",
             "muscle_cache_topk": f"MUSCLE (cache: topk, k={CACHE_TOPK_K})",
             "old_correct": "mask=old_correct", "all_old": "plain KD from v1 (all_old)",
             "token_likelihood": "token_likelihood + CE",
             "sequence_likelihood": "sequence_likelihood + CE",
             "ce_control": "CE control", "ce_control_4x": "CE control, 4x steps"}


@dataclass
class DemoConfig:
    """Everything that decides one seed's numbers."""

    seed: int = 0
    v1: BaseSpec = V1
    v2: BaseSpec = V2
    pre_batch: int = 128
    pre_lr: float = 1e-3
    n_pool: int = 2000  # task training pool, split train/val
    val_frac: float = 0.2
    n_test: int = 3000
    answer_len: int = 2  # answer tokens: op on the triple and on its rotations
    label_noise: float = 0.2  # share of answer tokens whose label is another digit
    loss_on: str = "all"  # "all": context and answer tokens; "answer": the answer tokens only
    lora_r: int = 8
    task_batch: int = 64
    task_lr: float = 2e-3
    # the lr decays linearly from task_lr to 0 over task_steps; the validation loss is measured
    # every task_eval_every steps and the checkpoint with the lowest one is kept
    task_steps: int = 1000
    task_eval_every: int = 25  # one epoch of the train split (1600 items, batch 64)
    task_inits: int = 2  # adapter inits per base; the one with the lower best val loss is kept
    compat_steps: int = 200
    compat_batch: int = 64
    compat_lr: float = 5e-4  # constant
    temperature: float = 1.0
    cache_topk_k: int = CACHE_TOPK_K  # k of the ``muscle_cache_topk`` row
    rows: Sequence[str] = COMPAT_ROWS

    def __post_init__(self):
        if self.loss_on not in ("all", "answer"):
            raise ValueError(f"loss_on must be 'all' or 'answer', got {self.loss_on!r}")
        if not 1 <= self.answer_len <= 3:
            raise ValueError(f"answer_len must be 1, 2 or 3, got {self.answer_len}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        unknown = [r for r in self.rows if r not in COMPAT_ROWS]
        if unknown:
            raise ValueError(f"unknown rows {unknown}; the rows are {list(COMPAT_ROWS)}")

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        return cls(seed=seed, v1=replace(V1, hidden=32, intermediate=64, steps=60),
                   v2=replace(V2, hidden=32, intermediate=64, steps=80, check_every=40,
                              max_runs=1),
                   n_pool=320, n_test=256, task_steps=40, task_eval_every=10, compat_steps=8,
                   task_batch=32, compat_batch=32)


# ---------------------------------------------------------------- the tokenizer


def build_tokenizer():
    """One word-level tokenizer shared by v1 and v2 (MUSCLE's requirement)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def encode(tok, texts: list[str]) -> torch.Tensor:
    return torch.tensor(tok(texts, add_special_tokens=True)["input_ids"], dtype=torch.long)


# ---------------------------------------------------------------- the task


def clean_answer(item: tuple, answer_len: int) -> tuple:
    """The op's answer: ``op`` on ``(a, b, c)``, then on the triple rotated once, twice."""
    op, a, b, c = item
    t = (a, b, c)
    return tuple(apply_op(op, *(t[k:] + t[:k])) for k in range(answer_len))


def task_answer(item: tuple, cfg: DemoConfig) -> tuple:
    """The task's label of ``item``: the clean answer, each token replaced with probability
    ``cfg.label_noise`` by another digit (uniform over the other nine). The draw depends on the
    item and the seed only, so an item has one label wherever it occurs."""
    ans = clean_answer(item, cfg.answer_len)
    if cfg.label_noise == 0.0:
        return ans
    op, a, b, c = item
    rng = np.random.default_rng([cfg.seed, 4099, OPS.index(op), a, b, c])
    out = []
    for d in ans:
        flip, shift = rng.random(), int(rng.integers(1, 10))
        out.append((d + shift) % 10 if flip < cfg.label_noise else d)
    return tuple(out)


def task_prompt(item: tuple) -> str:
    op, a, b, c = item
    return f"Q {op} {a} {b} {c} A"


def task_text(item: tuple, answer: tuple) -> str:
    return f"{task_prompt(item)} " + " ".join(map(str, answer))


def _items(rng: np.random.Generator, n: int, exclude=frozenset()) -> list[tuple]:
    """n distinct (op, a, b, c) task items, ops uniform, none in exclude."""
    out, seen = [], set(exclude)
    while len(out) < n:
        it = (OPS[rng.integers(len(OPS))], *map(int, rng.integers(0, 10, 3)))
        if it not in seen:
            seen.add(it)
            out.append(it)
    return out


def split_items(cfg: DemoConfig) -> tuple[list, list, list]:
    """(test, train, val): disjoint; train/val is the pool split (1 - val_frac) / val_frac."""
    rng = np.random.default_rng(cfg.seed)
    test = _items(rng, cfg.n_test)
    pool = _items(rng, cfg.n_pool, exclude=frozenset(test))
    n_val = round(cfg.val_frac * cfg.n_pool)
    return test, pool[n_val:], pool[:n_val]


def task_rows(tok, items, cfg: DemoConfig) -> list[dict]:
    """Task examples for training, labelled with the task's (noisy) answers. ``loss_on="all"``:
    every token after ``<bos>`` is a label (the context and the answer; the causal-LM shift
    happens inside the model); ``"answer"``: the answer tokens only. Nothing follows the answer:
    a trailing ``<eos>`` would be one more context label, not information about the task."""
    ids = encode(tok, [task_text(it, task_answer(it, cfg)) for it in items])
    labels = ids.clone()
    if cfg.loss_on == "answer":
        labels[:, :-cfg.answer_len] = -100
    else:
        labels[:, 0] = -100  # <bos> is never predicted (the model shifts labels by one)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab}
            for i, lab in zip(ids, labels)]


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------- pre-training corpora


def pretrain_text(it) -> str:
    op, a, b, c = it
    return f"{op} {a} {b} {c} = {apply_op(op, a, b, c)} <eos>"


def corpus_items(rng: np.random.Generator, spec: BaseSpec, n: int) -> list[tuple]:
    """n pre-training items, each op drawn with the mix's weights, then its three digits.

    Per item this draws exactly what ``rng.choice(len(ops), p=p)`` followed by
    ``rng.integers(0, 10, 3)`` draws (one uniform, searched in the normalised cdf), without
    ``choice``'s per-call argument checks, which cost as much as the rest of the batch."""
    ops = [o for o, w in spec.mix if w > 0]
    p = np.array([w for _, w in spec.mix if w > 0], dtype=float)
    p /= p.sum()
    cdf = p.cumsum()
    cdf /= cdf[-1]
    out = []
    for _ in range(n):
        op = ops[int(cdf.searchsorted(rng.random(), side="right"))]
        out.append((op, *map(int, rng.integers(0, 10, 3))))
    return out


def encode_pretrain(tok, items: list[tuple]) -> torch.Tensor:
    """Token ids of the pre-training texts of ``items``: what ``encode`` gives for
    ``pretrain_text`` (every token is a whole word of the vocabulary), without the tokenizer."""
    vocab = tok.get_vocab()
    bos, eq, eos = vocab["<bos>"], vocab["="], vocab["<eos>"]
    digit = [vocab[d] for d in DIGITS]
    return torch.tensor([[bos, vocab[op], digit[a], digit[b], digit[c], eq,
                          digit[apply_op(op, a, b, c)], eos] for op, a, b, c in items],
                        dtype=torch.long)


def corpus_floor(spec: BaseSpec, items: list[tuple]) -> float:
    """The causal-LM loss per predicted token that a model knowing every op of ``spec``'s mix
    gets on ``items`` (pre-training format): the op token costs -log p(op), each of the three
    digits log 10, and ``=``, the answer and ``<eos>`` nothing; 7 predicted tokens each."""
    w = dict(spec.mix)
    total = sum(w.values())
    nats = sum(-math.log(w[it[0]] / total) + 3 * math.log(10) for it in items)
    return nats / (7 * len(items))
