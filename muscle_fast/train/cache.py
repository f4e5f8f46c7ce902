"""Teacher cache: MUSCLE's two teachers run once over the training set, stored on disk, so that
training holds only the new base + compatibility adapter (and, for ``hidden``, the old model's
output head) and runs neither teacher body again.

Two kinds (``build_teacher_cache(kind=...)``):

* ``hidden`` (exact, the default): each teacher's last hidden state, the input of its output head
  (after the final norm), in the model's dtype, bit for bit; the old head's weights are stored
  beside it (the new teacher's head is the student's own). Training runs the fused-linear loss on
  the cached states and the heads: the loss is exactly MUSCLE's, at every temperature and mask.
  Bytes per token: ``H_old * e_old + H_new * e_new`` (``2 * H * e`` for one architecture).
* ``topk`` (compact): both teachers as :class:`muscle_fast.SparseTeacher` (top-k ids and
  log-probabilities at the temperature, the tail mass, the argmax, the label's log-probability),
  built from the full logits. No teacher weights during training; the KL is the exact KL over
  k + 1 categories, an approximation of the full one (benchmarks/NOTES.md, "Teacher cache").
  Bytes per token: ``2 * (8 k + 12)``. It fixes the temperature (and the labels).

On disk (``DIR``): ``manifest.json`` (format version, kind, vocabulary, tokenizer and model
fingerprints, the settings, and per shard its file, size, SHA-256 and each row's token-id
fingerprint and length), ``shard-NNNNN.safetensors`` (each row's positions packed one after the
other: ``old_hidden`` [sum L, H_old], ``new_hidden`` [sum L, H_new], or the ``topk`` fields), and
``heads.safetensors`` (``hidden``: the old head). A shard is written to a temporary name, synced and
renamed; its manifest entry is written (atomically) after it: an interrupted build loses at most
the shard in flight, and a resumed one rebuilds only the shards the manifest does not list.

Rows are found by their tokens: a batch row's key is the fingerprint of its ids up to its
attention mask's length (rows must be right-padded, the transformers default), so any collator,
shuffling, or order works and the dataset needs no extra column. A row the cache does not hold,
labels other than the build's (``topk``), a cache built at another temperature (``topk``) or
vocabulary, another base model, or a damaged shard is a :class:`TeacherCacheError` naming it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import (
    COMPAT_ADAPTER,
    CompatArguments,
    CompatModel,
    _adapter_path,
    _fused_linear_loss,
    _head_forward,
    _head_problem,
    _load_base,
    _materialised_loss,
    _output_head,
    _unwrap,
    _vocab_size,
)

__all__ = [
    "CachedCompatModel",
    "TeacherCache",
    "TeacherCacheError",
    "build_cached_compat_model",
    "build_teacher_cache",
    "cache_size_estimate",
    "token_fingerprint",
]

FORMAT_VERSION = 1
KINDS = ("hidden", "topk")
MANIFEST = "manifest.json"
HEADS = "heads.safetensors"
DEFAULT_TOPK = 128
_TEACHERS = ("old", "new")
_OPEN_SHARDS = 32  # shard files held open (memory-mapped) at once
_TOPK_FIELDS = ("indices", "logprobs", "tail_logprob", "argmax", "label_logprob")


class TeacherCacheError(ValueError):
    """A teacher cache that cannot serve this build or this batch; the message names why."""


# ------------------------------------------------------------------------------ fingerprints


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _bytes(t: Tensor):
    """The tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy()


def token_fingerprint(ids: Tensor | Sequence[int]) -> str:
    """Fingerprint of one row's token ids (any integer dtype; hashed as int64)."""
    t = torch.as_tensor(ids).reshape(-1).to(torch.int64)
    return _digest([_bytes(t)])


@contextlib.contextmanager
def _whole(params: Iterable[Tensor]):
    """DeepSpeed ZeRO-3 partitioned parameters (shape (0,) outside a forward) gathered whole for
    the block, the others as they are. A collective where any is partitioned: every rank calls it,
    in the same order."""
    parts = [p for p in params if hasattr(p, "ds_id")]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts):
        yield


def _tensors_fingerprint(named: Iterable[tuple[str, Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for n, t in sorted(named, key=lambda kv: kv[0]):
        with _whole([t]):  # one parameter at a time: never a whole ZeRO-3 base gathered at once
            h.update(f"{n}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(_bytes(t))
    return h.hexdigest()


def _norm_name(name: str) -> str:
    for prefix in ("base_model.model.", "module."):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer.", ".")


def model_fingerprints(model: nn.Module) -> dict:
    """``{"base": ..., "adapter": ...}``: the weights outside any peft adapter, and those of the
    active adapter(s) (None without one), hashed with their names, dtypes and shapes."""
    adapters = _active_adapters(model)
    base, lora = [], []
    for n, p in _unwrap(model).named_parameters():
        if "lora_" in n:
            for a in adapters:
                if f".{a}." in n or n.endswith(f".{a}"):
                    lora.append((_norm_name(n).replace(f".{a}", ""), p))
        else:
            base.append((_norm_name(n), p))
    return {"base": _tensors_fingerprint(base),
            "adapter": _tensors_fingerprint(lora) if lora else None}


def _active_adapters(model: nn.Module) -> list[str]:
    m = _unwrap(model)
    if not hasattr(m, "peft_config"):
        return []
    active = getattr(m, "active_adapters", None)
    active = active() if callable(active) else active
    return list(active or [m.active_adapter])


def _head_tensors(head: nn.Module) -> dict:
    out = {"weight": head.weight}
    if getattr(head, "bias", None) is not None:
        out["bias"] = head.bias
    return out


def _head_fingerprint(head: nn.Module) -> str:
    return _tensors_fingerprint(_head_tensors(head).items())


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Fingerprint of a tokenizer's vocabulary (token -> id) and its special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(x) for x in getattr(tokenizer, "all_special_tokens", []))
    return _digest([json.dumps([vocab, special]).encode()])


# ------------------------------------------------------------------------------ rows


def _row_parts(row: dict, index: Any, ignore_index: int = -100):
    """(ids [L], labels [L] or None) of one dataset row: the tokens up to its attention mask."""
    if "input_ids" not in row:
        raise TeacherCacheError(f"dataset row {index} has no 'input_ids'")
    ids = torch.as_tensor(row["input_ids"]).reshape(-1).to(torch.int64)
    labels = row.get("labels")
    labels = None if labels is None else torch.as_tensor(labels).reshape(-1).to(torch.int64)
    attn = row.get("attention_mask")
    n = ids.numel()
    if attn is not None:
        attn = torch.as_tensor(attn).reshape(-1)
        n = _prefix_length(attn, f"dataset row {index}")
    if labels is not None:
        if labels.numel() != ids.numel():
            raise TeacherCacheError(f"dataset row {index}: labels has {labels.numel()} entries, "
                                    f"input_ids {ids.numel()}")
        if bool((labels[n:] != ignore_index).any()):
            raise TeacherCacheError(
                f"dataset row {index} has labels outside its attention mask (positions >= {n}): "
                "the cache holds the teachers on the attended tokens only")
        labels = labels[:n]
    return ids[:n], labels


def _prefix_length(attn: Tensor, what: str) -> int:
    n = int(attn.ne(0).sum())
    if n and not bool(attn[:n].ne(0).all()):
        raise TeacherCacheError(
            f"{what}: the attention mask is not a prefix of ones (left padding or holes): the "
            "cache holds each row from position 0; pad on the right (tokenizer.padding_side = "
            "'right')")
    return n


def _labels_fingerprint(labels: Tensor | None) -> str | None:
    return None if labels is None else token_fingerprint(labels)


# ------------------------------------------------------------------------------ manifest I/O


def _fsync_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)


def _replace(src: str, dst: str) -> None:
    """The commit point of a file (a test interrupts a build here)."""
    os.replace(src, dst)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        if os.path.isdir(directory):
            raise TeacherCacheError(f"{directory} is not a teacher cache (no {MANIFEST}); build "
                                    "one with muscle-fast cache-teachers / build_teacher_cache")
        raise TeacherCacheError(f"teacher cache {directory} does not exist")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise TeacherCacheError(f"{path} is not valid JSON ({e})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise TeacherCacheError(f"{path} has format version {version!r}; this muscle_fast reads "
                                f"version {FORMAT_VERSION}: rebuild the cache")
    return manifest


# ------------------------------------------------------------------------------ size estimate


def _bytes_per_token(kind: str, hidden_sizes=None, elem_sizes=None, k=None) -> int:
    if kind == "hidden":
        return sum(h * e for h, e in zip(hidden_sizes, elem_sizes))
    return 2 * (8 * k + 12)  # int32 id + float32 logprob per entry; tail, argmax, label: 4 B each


def cache_size_estimate(kind: str, n_tokens: int, *, hidden_sizes=(0, 0), elem_sizes=(4, 4),
                        k: int | None = None) -> int:
    """Bytes the shards of a cache of ``n_tokens`` tokens hold (without the few-KB headers and,
    for ``hidden``, the old head's weights)."""
    return n_tokens * _bytes_per_token(kind, hidden_sizes, elem_sizes, k)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


# ------------------------------------------------------------------------------ the builder


@dataclass
class _Teacher:
    name: str
    model: nn.Module
    head: nn.Module


def _capture_hidden(model: nn.Module, head: nn.Module, ids: Tensor, attn: Tensor) -> Tensor:
    seen = {}

    def forward(h):
        seen["h"] = h
        return h.new_zeros((*h.shape[:-1], 0))

    with _head_forward(head, forward):
        model(input_ids=ids, attention_mask=attn)
    return seen["h"]


def _sparse_cls():
    try:
        from muscle_fast.sparse_teacher import SparseTeacher
    except ImportError as e:  # pragma: no cover - the sparse teacher ships with this package
        raise TeacherCacheError(f"kind='topk' needs muscle_fast.SparseTeacher ({e})") from None
    return SparseTeacher


def build_teacher_cache(
    directory: str | os.PathLike,
    dataset: Sequence[dict],
    *,
    old_model: nn.Module,
    new_model: nn.Module,
    kind: str = "hidden",
    k: int | None = None,
    temperature: float = 2.0,
    tokenizer: Any = None,
    batch_size: int = 8,
    rows_per_shard: int = 512,
    ignore_index: int = -100,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
) -> TeacherCache:
    """Run the old and the new task model once over ``dataset`` and store what MUSCLE's loss needs.

    Args:
        directory: the cache folder (created). If it holds a manifest of the same build (models,
            dataset, kind, settings), the build resumes: shards already listed are kept. A
            manifest of another build is an error unless ``overwrite``.
        dataset: a sequence of rows (dicts: ``input_ids``, optional ``attention_mask`` (a prefix
            of ones: right padding) and ``labels``, lists or tensors), e.g. a tokenized
            ``datasets.Dataset``: the rows the training will see, in any order.
        old_model: the old task model (old base + old task adapter, e.g. a ``PeftModel``).
        new_model: the new task model (new base + new task adapter).
        kind: ``"hidden"`` (exact; needs output heads that are plain linear maps) or ``"topk"``.
        k: top-k entries per token for ``"topk"`` (default :data:`DEFAULT_TOPK`).
        temperature: the training temperature, fixed by ``"topk"`` (``"hidden"`` serves any).
        tokenizer: recorded by fingerprint (optional).
        batch_size: rows per forward pass (right-padded).
        rows_per_shard: rows per shard file (the most an interruption loses).
        progress: a tqdm progress bar; ``log``: where the size estimate and the summary go.

    Returns:
        :class:`TeacherCache` opened on the finished cache.
    """
    directory = os.fspath(directory)
    if kind not in KINDS:
        raise TeacherCacheError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "topk":
        k = DEFAULT_TOPK if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise TeacherCacheError(f"k must be a positive int, got {k!r}")
    elif k is not None:
        raise TeacherCacheError("k is a setting of kind='topk'; kind='hidden' stores no top-k")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise TeacherCacheError(f"temperature must be a finite number > 0, got {temperature!r}")
    if batch_size < 1 or rows_per_shard < 1:
        raise TeacherCacheError("batch_size and rows_per_shard must be >= 1")

    teachers = []
    for name, model in (("old", old_model), ("new", new_model)):
        head = _output_head(model)
        if kind == "hidden":
            problem = _head_problem(model) or CompatModel._probe(None, model, _device(model))
            if problem is not None:
                raise TeacherCacheError(
                    f"kind='hidden' replays each teacher's output head on its cached hidden "
                    f"states, but the {name} model's logits are not a plain linear head: "
                    f"{problem}. Use kind='topk', which stores what the logits say")
        teachers.append(_Teacher(name, model, head))
    vocab = int(teachers[0].head.weight.shape[0])
    v_new = int(teachers[1].head.weight.shape[0])
    if vocab != v_new:
        raise TeacherCacheError(f"old model has a vocabulary of {vocab} tokens, new model {v_new}: "
                                "MUSCLE needs one vocabulary")

    rows = [_row_parts(dataset[i], i, ignore_index) for i in range(len(dataset))]
    if not rows:
        raise TeacherCacheError("the dataset is empty")
    has_labels = [r[1] is not None for r in rows]
    if any(has_labels) and not all(has_labels):
        raise TeacherCacheError("some dataset rows have labels and others not")
    lengths = [int(r[0].numel()) for r in rows]
    n_tokens = sum(lengths)
    hidden_sizes = [int(t.head.weight.shape[1]) for t in teachers]
    dtypes = [_dtype_of(t.model) for t in teachers]
    elem = [torch.empty((), dtype=d).element_size() for d in dtypes]

    header = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "vocab_size": vocab,
        "tokenizer": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        "models": {t.name: {**model_fingerprints(t.model), "head": _head_fingerprint(t.head),
                            "dtype": str(d).replace("torch.", ""), "hidden_size": h}
                   for t, d, h in zip(teachers, dtypes, hidden_sizes)},
        "k": k,
        "temperature": float(temperature) if kind == "topk" else None,
        "labels": bool(all(has_labels)),
        "ignore_index": ignore_index,
        "rows_per_shard": rows_per_shard,
        "n_rows": len(rows),
        "n_tokens": n_tokens,
        "dataset": _digest(token_fingerprint(r[0]).encode() + (
            _labels_fingerprint(r[1]) or "").encode() for r in rows),
    }
    est = cache_size_estimate(kind, n_tokens, hidden_sizes=hidden_sizes, elem_sizes=elem, k=k)
    head_bytes = (sum(t.numel() * t.element_size() for t in _head_tensors(teachers[0].head).values())
                  if kind == "hidden" else 0)
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    per = _bytes_per_token(kind, hidden_sizes, elem, k)
    how = (f"old {hidden_sizes[0]} x {elem[0]} B + new {hidden_sizes[1]} x {elem[1]} B"
           if kind == "hidden" else f"2 x (8 x k={k} + 12) B")
    log(f"teacher cache ({kind}): {len(rows)} rows, {n_tokens} tokens x {per} B/token ({how}) = "
        f"{_human(est)}" + (f" + old head {_human(head_bytes)}" if head_bytes else "")
        + f"; {_human(free)} free in {directory}")
    if est + head_bytes > free:
        raise TeacherCacheError(f"the cache needs about {_human(est + head_bytes)}, but only "
                                f"{_human(free)} is free in {directory}")

    manifest = _resume_or_start(directory, header, overwrite)
    if kind == "hidden" and not _heads_ok(directory, manifest):
        from safetensors.torch import save_file

        tmp = os.path.join(directory, f".{HEADS}.tmp-{os.getpid()}")
        save_file({f"old.{n}": t.detach().contiguous().cpu()
                   for n, t in _head_tensors(teachers[0].head).items()}, tmp)
        _fsync_file(tmp)
        _replace(tmp, os.path.join(directory, HEADS))
    done = {s["index"] for s in manifest["shards"]}
    n_shards = -(-len(rows) // rows_per_shard)
    todo = [i for i in range(n_shards) if i not in done]
    t0 = time.perf_counter()
    bar = _progress(sum(min(rows_per_shard, len(rows) - i * rows_per_shard) for i in todo),
                    f"cache-teachers ({kind})", not progress)
    if done:
        log(f"resuming: {len(done)} of {n_shards} shards already in {directory}")
    was = [t.model.training for t in teachers]
    for t in teachers:
        t.model.eval()
    try:
        with torch.no_grad():
            for i in todo:
                lo, hi = i * rows_per_shard, min((i + 1) * rows_per_shard, len(rows))
                tensors = _shard_tensors(teachers, rows[lo:hi], kind, k, temperature, batch_size,
                                         ignore_index, bar)
                entry = _write_shard(directory, i, lo, rows[lo:hi], tensors)
                manifest["shards"].append(entry)
                manifest["shards"].sort(key=lambda s: s["index"])
                manifest["complete"] = len(manifest["shards"]) == n_shards
                _fsync_write(os.path.join(directory, MANIFEST),
                             json.dumps(manifest, indent=1).encode())
    finally:
        bar.close()
        for t, w in zip(teachers, was):
            t.model.train(w)
    if not manifest.get("complete"):  # nothing was left to build (an empty todo)
        manifest["complete"] = True
        _fsync_write(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1).encode())
    size = sum(s["bytes"] for s in manifest["shards"])
    log(f"teacher cache ({kind}) in {directory}: {len(rows)} rows, {_human(size)} in "
        f"{n_shards} shards ({size / max(n_tokens, 1):.0f} B/token), {len(todo)} shards built in "
        f"{time.perf_counter() - t0:.1f} s")
    return TeacherCache(directory)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype_of(model: nn.Module) -> torch.dtype:
    head = _output_head(model)
    return head.weight.dtype


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _progress(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=disable, dynamic_ncols=True)


def _resume_or_start(directory: str, header: dict, overwrite: bool) -> dict:
    path = os.path.join(directory, MANIFEST)
    if os.path.exists(path) and not overwrite:
        try:
            old = _read_manifest(directory)
        except TeacherCacheError:
            old = None
        if old is None or {k: old.get(k) for k in header} != header:
            diff = [] if old is None else [k for k in header if old.get(k) != header[k]]
            raise TeacherCacheError(
                f"{directory} already holds a teacher cache of another build (different: "
                f"{', '.join(diff) or 'unreadable manifest'}); choose a new directory or pass "
                "overwrite=True (--overwrite)")
        keep = [s for s in old["shards"] if _shard_file_ok(directory, s)]
        for name in os.listdir(directory):  # what an interrupted build left in flight
            if ".tmp-" in name:
                os.remove(os.path.join(directory, name))
        return {**header, "shards": keep, "complete": False}
    if overwrite:
        for name in os.listdir(directory):
            if name == MANIFEST or name == HEADS or name.startswith("shard-") or ".tmp-" in name:
                os.remove(os.path.join(directory, name))
    manifest = {**header, "shards": [], "complete": False}
    _fsync_write(path, json.dumps(manifest, indent=1).encode())
    return manifest


def _shard_file_ok(directory: str, entry: dict) -> bool:
    path = os.path.join(directory, entry["file"])
    return (os.path.exists(path) and os.path.getsize(path) == entry["bytes"]
            and _sha256(path) == entry["sha256"])


def _heads_ok(directory: str, manifest: dict) -> bool:
    path = os.path.join(directory, HEADS)
    if not os.path.exists(path):
        return False
    try:
        from safetensors.torch import load_file

        t = load_file(path)
        return _tensors_fingerprint(
            (n[len("old."):], v) for n, v in t.items()) == manifest["models"]["old"]["head"]
    except Exception:  # noqa: BLE001 - any unreadable file is rewritten
        return False


def _shard_tensors(teachers, rows, kind, k, temperature, batch_size, ignore_index, bar) -> dict:
    parts: dict[str, list[Tensor]] = {}
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        lens = [int(r[0].numel()) for r in chunk]
        width = max(max(lens), 1)
        ids = torch.zeros(len(chunk), width, dtype=torch.int64)
        attn = torch.zeros_like(ids)
        for j, (x, _) in enumerate(chunk):
            ids[j, :x.numel()] = x
            attn[j, :x.numel()] = 1
        for t in teachers:
            d = _device(t.model)
            if kind == "hidden":
                h = _capture_hidden(t.model, t.head, ids.to(d), attn.to(d))
                for j, n in enumerate(lens):
                    parts.setdefault(f"{t.name}_hidden", []).append(h[j, :n].cpu())
            else:
                logits = t.model(input_ids=ids.to(d), attention_mask=attn.to(d)).logits
                for j, (n, (_, lab)) in enumerate(zip(lens, chunk)):
                    shifted = None
                    if lab is not None:  # position t predicts labels[t + 1]
                        shifted = torch.full((n,), ignore_index, dtype=torch.int64)
                        shifted[:-1] = lab[1:]
                        shifted = shifted.to(d)
                    st = _sparse_cls().from_logits(logits[j, :n], k=min(k, logits.shape[-1]),
                                                   temperature=temperature, labels=shifted,
                                                   ignore_index=ignore_index)
                    for f in _TOPK_FIELDS:
                        v = getattr(st, f)
                        if v is None:
                            continue
                        v = v.to(torch.int32) if f in ("indices", "argmax") else v.float()
                        parts.setdefault(f"{t.name}_{f}", []).append(v.cpu())
        bar.update(len(chunk))
    return {n: torch.cat(v) if v else torch.empty(0) for n, v in parts.items()}


def _write_shard(directory: str, index: int, first_row: int, rows, tensors: dict) -> dict:
    from safetensors.torch import save_file

    name = f"shard-{index:05d}.safetensors"
    path = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    lengths = [int(r[0].numel()) for r in rows]
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    save_file({**{n: t.contiguous() for n, t in tensors.items()}, "offsets": offsets}, tmp,
              metadata={"format_version": str(FORMAT_VERSION), "first_row": str(first_row)})
    _fsync_file(tmp)
    digest = _sha256(tmp)
    _replace(tmp, path)
    return {"index": index, "file": name, "bytes": os.path.getsize(path), "sha256": digest,
            "first_row": first_row, "lengths": lengths,
            "tokens": [token_fingerprint(r[0]) for r in rows],
            "labels": [_labels_fingerprint(r[1]) for r in rows]}


# ------------------------------------------------------------------------------ reading


class TeacherCache:
    """A built teacher cache, opened for reading (shards memory-mapped by safetensors).

    ``TeacherCache(DIR)`` checks the manifest (format version, completeness) and every shard's
    size and header; ``verify=True`` also each shard's SHA-256 (reads the whole cache). Rows are
    found by token fingerprint; :meth:`teachers` returns a batch's cached teachers."""

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        from safetensors import safe_open

        self.directory = os.fspath(directory)
        self.manifest = m = _read_manifest(self.directory)
        if not m.get("complete"):
            raise TeacherCacheError(
                f"teacher cache {self.directory} is incomplete ({len(m['shards'])} of "
                f"{-(-m['n_rows'] // m['rows_per_shard'])} shards): the build was interrupted; "
                "run it again with the same arguments to resume")
        self.kind = m["kind"]
        self.vocab_size = m["vocab_size"]
        self.k = m.get("k")
        self.temperature = m.get("temperature")
        self._files, self._rows = [], {}
        for s in m["shards"]:
            path = os.path.join(self.directory, s["file"])
            if not os.path.exists(path):
                raise TeacherCacheError(f"shard {s['file']} of {self.directory} is missing")
            size = os.path.getsize(path)
            if size != s["bytes"]:
                raise TeacherCacheError(
                    f"shard {s['file']} of {self.directory} is {size} bytes, the manifest says "
                    f"{s['bytes']}: the shard is truncated or damaged; delete it and run the "
                    "build again to rebuild it")
            if verify and _sha256(path) != s["sha256"]:
                raise TeacherCacheError(f"shard {s['file']} of {self.directory} does not match "
                                        "its SHA-256 in the manifest: it is damaged")
            try:
                with safe_open(path, framework="pt") as f:
                    offsets = f.get_tensor("offsets").tolist()
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise TeacherCacheError(f"shard {s['file']} of {self.directory} is unreadable "
                                        f"({e})") from None
            if offsets != [0, *torch.tensor(s["lengths"]).cumsum(0).tolist()]:
                raise TeacherCacheError(f"shard {s['file']} of {self.directory} does not hold "
                                        "the rows its manifest entry lists")
            fi = len(self._files)
            self._files.append((path, offsets))
            for j, (tok, lab) in enumerate(zip(s["tokens"], s["labels"])):
                self._rows.setdefault(tok, []).append((fi, j, lab))
        self._heads = None
        self._open: OrderedDict = OrderedDict()  # the most recently read shards, memory-mapped

    def _handle(self, fi: int):
        from safetensors import safe_open

        f = self._open.pop(fi, None)
        if f is None:
            f = safe_open(self._files[fi][0], framework="pt")
            while len(self._open) >= _OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open[fi] = f
        return f

    def __deepcopy__(self, memo) -> TeacherCache:
        return self  # read-only files: a copied model shares them

    def __getstate__(self) -> dict:
        return {"directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])

    def __repr__(self) -> str:
        extra = f", k={self.k}, temperature={self.temperature}" if self.kind == "topk" else ""
        return (f"TeacherCache({self.directory!r}, kind={self.kind!r}, rows="
                f"{self.manifest['n_rows']}, vocab_size={self.vocab_size}{extra})")

    # ---- checks against the training setup

    def check_tokenizer(self, tokenizer: Any) -> None:
        want = self.manifest.get("tokenizer")
        if want is not None and tokenizer_fingerprint(tokenizer) != want:
            raise TeacherCacheError(f"the tokenizer differs from the one the cache {self.directory} "
                                    "was built with")

    def check_args(self, args: CompatArguments, vocab: int) -> None:
        if vocab != self.vocab_size:
            raise TeacherCacheError(
                f"the student has a vocabulary of {vocab}, the teacher cache {self.directory} was "
                f"built at {self.vocab_size}")
        if self.kind == "topk":
            if float(args.temperature) != self.temperature:
                raise TeacherCacheError(
                    f"the topk teacher cache {self.directory} was built at temperature "
                    f"{self.temperature}, training uses {args.temperature}: a top-k cache fixes "
                    "T (rebuild it at this T, or use kind='hidden', which serves any T)")
            if args.mask in ("token_likelihood", "sequence_likelihood") and not \
                    self.manifest.get("labels"):
                raise TeacherCacheError(
                    f"mask={args.mask!r} needs the teachers' label log-probabilities, but the "
                    f"topk cache {self.directory} was built from rows without labels")

    def old_head(self) -> dict:
        """The old model's head tensors (``{"weight", "bias"?}``), checked by fingerprint."""
        if self.kind != "hidden":
            raise TeacherCacheError("a topk cache stores no head")
        if self._heads is None:
            from safetensors.torch import load_file

            path = os.path.join(self.directory, HEADS)
            if not os.path.exists(path):
                raise TeacherCacheError(f"{path} is missing: the old model's head is part of a "
                                        "hidden-state cache")
            try:
                t = {n[len("old."):]: v for n, v in load_file(path).items()}
            except Exception as e:  # noqa: BLE001
                raise TeacherCacheError(f"{path} is unreadable ({e})") from None
            if _tensors_fingerprint(t.items()) != self.manifest["models"]["old"]["head"]:
                raise TeacherCacheError(f"{path} does not hold the old head the cache was built "
                                        "with (its fingerprint differs)")
            self._heads = t
        return self._heads

    # ---- lookup

    def locate(self, input_ids: Tensor, attention_mask: Tensor | None,
               labels: Tensor | None) -> list[tuple[int, int, int]]:
        """``[(file, row in file, length)]`` of each batch row; a row the cache lacks is an error."""
        ids = input_ids.detach().cpu()
        attn = None if attention_mask is None else attention_mask.detach().cpu()
        lab = None if labels is None else labels.detach().cpu()
        ign = self.manifest.get("ignore_index", -100)
        out = []
        for i in range(ids.shape[0]):
            n = ids.shape[1] if attn is None else _prefix_length(attn[i], f"batch row {i}")
            if lab is not None and bool((lab[i, n:] != ign).any()):
                raise TeacherCacheError(
                    f"batch row {i} has labels outside its attention mask (positions >= {n}): the "
                    "cache holds the teachers on the attended tokens only")
            fp = token_fingerprint(ids[i, :n])
            hits = self._rows.get(fp)
            if not hits:
                raise TeacherCacheError(
                    f"batch row {i} ({n} tokens, fingerprint {fp}) is not in the teacher cache "
                    f"{self.directory} ({self.manifest['n_rows']} rows): the batch does not match "
                    "the dataset the cache was built from (other data, tokenization, truncation "
                    "length or padding side)")
            if self.kind == "topk" and lab is not None and self.manifest.get("labels"):
                lfp = token_fingerprint(lab[i, :n])
                hits = [h for h in hits if h[2] == lfp]
                if not hits:
                    raise TeacherCacheError(
                        f"batch row {i}'s labels differ from those the topk cache "
                        f"{self.directory} was built with (its label log-probabilities and "
                        "likelihood masks depend on them)")
            fi, j, _ = hits[0]
            out.append((fi, j, n))
        return out

    def _slice(self, fi: int, j: int, name: str) -> Tensor:
        offsets = self._files[fi][1]
        try:
            return self._handle(fi).get_slice(name)[offsets[j]:offsets[j + 1]]
        except Exception as e:  # noqa: BLE001
            raise TeacherCacheError(f"shard {fi} of {self.directory}: cannot read {name} ({e})") \
                from None

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(old_hidden, new_hidden)`` [B, T, H] of a batch (zeros past each row's length)."""
        if self.kind != "hidden":
            raise TeacherCacheError(f"the teacher cache {self.directory} is of kind {self.kind!r}")
        where = self.locate(input_ids, attention_mask, labels)
        out = []
        for t in _TEACHERS:
            info = self.manifest["models"][t]
            dtype = getattr(torch, info["dtype"])
            h = torch.zeros(*input_ids.shape, info["hidden_size"], dtype=dtype)
            for i, (fi, j, n) in enumerate(where):
                h[i, :n] = self._slice(fi, j, f"{t}_hidden")
            out.append(h.to(input_ids.device))
        return out[0], out[1]

    def sparse(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               labels: Tensor | None = None):
        """``(old, new)`` :class:`SparseTeacher` [B, T] of a batch (a uniform placeholder past each
        row's length, where every label is ignored)."""
        if self.kind != "topk":
            raise TeacherCacheError(f"the teacher cache {self.directory} is of kind {self.kind!r}")
        where = self.locate(input_ids, attention_mask, labels)
        SparseTeacher = _sparse_cls()
        B, T = input_ids.shape
        k, V = self.k, self.vocab_size
        k = min(k, V)
        out = []
        for t in _TEACHERS:
            idx = torch.arange(k, dtype=torch.int32).expand(B, T, k).clone()
            lp = torch.full((B, T, k), -math.log(V), dtype=torch.float32)
            tail = torch.full((B, T), math.log((V - k) / V) if V > k else -math.inf)
            am = torch.zeros(B, T, dtype=torch.int64)
            has_label = self.manifest.get("labels") and labels is not None
            llp = torch.zeros(B, T) if has_label else None
            for i, (fi, j, n) in enumerate(where):
                idx[i, :n] = self._slice(fi, j, f"{t}_indices")
                lp[i, :n] = self._slice(fi, j, f"{t}_logprobs")
                tail[i, :n] = self._slice(fi, j, f"{t}_tail_logprob")
                am[i, :n] = self._slice(fi, j, f"{t}_argmax").to(torch.int64)
                if llp is not None:
                    llp[i, :n] = self._slice(fi, j, f"{t}_label_logprob")
            dev = input_ids.device
            shifted = None
            if llp is not None:  # position t predicts labels[:, t + 1], as at the build
                shifted = torch.full((B, T), self.manifest.get("ignore_index", -100),
                                     dtype=torch.int64)
                shifted[:, :-1] = labels.detach().cpu()[:, 1:]
                llp = torch.where(shifted == self.manifest.get("ignore_index", -100), 0.0, llp)
            out.append(_make_sparse(SparseTeacher, idx.to(dev), lp.to(dev), tail.to(dev),
                                    am.to(dev), None if llp is None else llp.to(dev),
                                    None if shifted is None else shifted.to(dev),
                                    self.temperature, V))
        return out[0], out[1]


def _make_sparse(cls, indices, logprobs, tail, argmax, label_logprob, labels, temperature,
                 vocab):
    return cls(indices=indices, logprobs=logprobs, tail_logprob=tail, argmax=argmax,
               label_logprob=label_logprob, labels=labels, temperature=temperature,
               vocab_size=vocab)


# ------------------------------------------------------------------------------ training


class CachedCompatModel(CompatModel):
    """The student (new base + compatibility adapter) with its teachers read from a
    :class:`TeacherCache`: no old model body, no teacher forward.

    ``kind="hidden"``: the new teacher's head is the student's own (checked against the cache by
    fingerprint), the old head is loaded from the cache (or is the student's, when the two are
    the same weights). Trains with :class:`CompatTrainer`, :func:`compat_training_step` and
    :func:`compat_loss` like :class:`CompatModel`; checkpoints hold only the compatibility adapter.

    Under DeepSpeed ZeRO-3 and FSDP2 the heads' weights are read only inside the heads' forwards
    (whole there; partitioned or sharded outside), as :class:`CompatModel` reads them, and the
    checks at construction gather each partitioned parameter in turn.
    """

    def __init__(self, student: nn.Module, cache: TeacherCache | str | os.PathLike):
        nn.Module.__init__(self)
        if not hasattr(student, "peft_config") or COMPAT_ADAPTER not in student.peft_config:
            raise ValueError(f"student needs the compatibility adapter {COMPAT_ADAPTER!r} (peft)")
        self.student = student
        self.config = student.config
        self.cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
        self._fused_reason = None
        self._vocab = _vocab_size(student)  # ZeRO-3: the partitioned head's whole shape
        self.old_head = None
        self._check_student()
        for n, p in student.named_parameters():
            if "lora_" in n and f".{COMPAT_ADAPTER}." not in n:
                p.requires_grad_(False)  # another adapter (e.g. the frozen "teacher") stays frozen

    def _check_student(self) -> None:
        c, m = self.cache, self.cache.manifest
        head = _output_head(self.student)
        vocab = self._vocab
        if vocab != c.vocab_size:
            raise TeacherCacheError(f"the student has a vocabulary of {vocab}, the teacher cache "
                                    f"{c.directory} was built at {c.vocab_size}")
        fp = model_fingerprints(self.student)["base"]
        if fp != m["models"]["new"]["base"]:
            raise TeacherCacheError(
                f"the student's base weights are not the new base the teacher cache "
                f"{c.directory} was built with (fingerprint {fp}, the cache's "
                f"{m['models']['new']['base']})")
        if c.kind != "hidden":
            return
        base_head = getattr(head, "base_layer", head)
        if _head_fingerprint(base_head) != m["models"]["new"]["head"]:
            raise TeacherCacheError(f"the student's output head is not the new teacher's head "
                                    f"the cache {c.directory} was built with")
        if m["models"]["old"]["head"] == m["models"]["new"]["head"]:
            return  # one head: the student's own serves both teachers
        t = c.old_head()
        w = t["weight"].to(head.weight.device)
        lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in t, device="meta", dtype=w.dtype)
        # the loaded tensors themselves (no second copy of a [V, H] weight)
        lin.weight = nn.Parameter(w, requires_grad=False)
        if "bias" in t:
            lin.bias = nn.Parameter(t["bias"].to(w.device), requires_grad=False)
        self.old_head = lin
        c._heads = None  # the Linear holds them now

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        return self

    def _old_head(self) -> nn.Module:
        return self.old_head if self.old_head is not None else _output_head(self.student)

    def _fused_problem(self, device) -> str | None:
        if self._fused_reason is None:
            reason = _head_problem(self.student) or self._probe(self.student, device)
            if reason is not None:
                reason = f"student model: {reason}"
                warnings.warn(
                    f"muscle_fast: the fused training loss (CompatArguments.fused_linear) is off "
                    f"because of the {reason}; training steps materialise [batch, seq, vocab] "
                    "logits", stacklevel=4)
            self._fused_reason = reason or ""
        return self._fused_reason or None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, return_teacher_logits: bool = False,
                compat_args: CompatArguments | None = None,
                num_items: None | int | Tensor = None, **kwargs):
        """As :meth:`CompatModel.forward`, with the teachers read from the cache."""
        if compat_args is not None:
            if labels is None:
                raise ValueError("compat_args needs labels")
            self.cache.check_args(compat_args, self._vocab)
            if self._fused_problem(input_ids.device) is None:
                return self._cached_fused_loss(input_ids, attention_mask, labels, compat_args,
                                               num_items, **kwargs)
            return_teacher_logits = True
        teachers = (self.teacher_logits(input_ids, attention_mask, labels)
                    if return_teacher_logits else None)
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if compat_args is not None:
            loss, stats = _materialised_loss(out.logits, *teachers, labels, compat_args, num_items)
            return loss, stats, out
        return out if teachers is None else (out, *teachers)

    @torch.no_grad()
    def teacher_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                       labels: Tensor | None = None):
        """``(old, new)``: [B, T, V] logits replayed through the heads (``hidden``), or
        :class:`SparseTeacher` [B, T] (``topk``)."""
        if self.cache.kind == "topk":
            return self.cache.sparse(input_ids, attention_mask, labels)
        old_h, new_h = self.cache.hidden(input_ids, attention_mask, labels)
        oh, nh = self._old_head(), _output_head(self.student)
        return _head_linear(getattr(oh, "base_layer", oh), old_h), \
            _head_linear(getattr(nh, "base_layer", nh), new_h)

    def _cached_fused_loss(self, input_ids, attention_mask, labels, args, num_items, **kwargs):
        from muscle_fast.linear import fused_linear_compat_loss

        from .model import train_chunk_size

        head = _output_head(self.student)
        if self.cache.kind == "hidden":
            old_h, new_h = self.cache.hidden(input_ids, attention_mask, labels)
        else:
            old_s, new_s = self.cache.sparse(input_ids, attention_mask, labels)
        result = {}

        def student_head(h):
            # called as head(h): this head's weight is whole now (ZeRO-3 gathers it in the
            # head's forward, FSDP2 in its unit's); a separate old head is read inside its own
            # forward, called from here, as CompatModel's fused loss does
            if self.cache.kind == "hidden" and self.old_head is not None:
                def old_head_forward(_):
                    result["loss"] = _fused_linear_loss(h, head, old_h, self.old_head, new_h,
                                                        labels, args, num_items)
                    return h.new_zeros((0,))

                with _head_forward(self.old_head, old_head_forward):
                    self.old_head(old_h[:0])
            elif self.cache.kind == "hidden":  # one head serves both teachers
                result["loss"] = _fused_linear_loss(h, head, old_h, head, new_h, labels, args,
                                                    num_items)
            else:
                w, b = head.weight, head.bias
                if w.dtype != h.dtype:
                    w, b = w.to(h.dtype), None if b is None else b.to(h.dtype)
                chunk = (args.chunk_size if args.chunk_size is not None
                         else train_chunk_size(w.shape[0], h.device))
                with torch.autocast(h.device.type, enabled=False):
                    result["loss"] = fused_linear_compat_loss(
                        h[:, :-1], w, labels[:, 1:], bias=b, old_logits=old_s[:, :-1],
                        new_logits=new_s[:, :-1], chunk_size=chunk, mask=args.mask,
                        temperature=args.temperature, kl_weight=args.kl_weight,
                        ce_weight=args.ce_weight, num_items=num_items, impl=args.impl,
                        return_stats=True)
            return result["loss"][0].reshape(1, 1, 1).expand(*h.shape[:-1], 0)

        with _head_forward(head, student_head):
            self.student(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        loss, stats = result["loss"]
        return loss, stats, None


@torch.no_grad()
def _head_linear(head: nn.Module, h: Tensor) -> Tensor:
    """``F.linear(h, head.weight, head.bias)`` run as ``head``'s forward, where a ZeRO-3 or FSDP2
    sharded weight is whole."""
    out = {}

    def linear(x):
        out["z"] = F.linear(x, head.weight, head.bias)
        return out["z"]

    with _head_forward(head, linear):
        head(h)
    return out["z"]


def cached_model(model: nn.Module, teacher_cache) -> nn.Module:
    """``model`` set up to read its teachers from ``teacher_cache``: a :class:`CachedCompatModel`
    (or a DDP/FSDP/DeepSpeed wrapper of one) as is; a peft student, or a live
    :class:`CompatModel` (its student only), wrapped once (the wrapper is kept on the student for
    the next call)."""
    inner = _unwrap(model)
    if type(inner).__name__ == "DeepSpeedEngine":  # CompatTrainer under DeepSpeed passes its engine
        inner = _unwrap(inner.module)
    directory = os.path.abspath(os.fspath(getattr(teacher_cache, "directory", teacher_cache)))
    if isinstance(inner, CachedCompatModel):
        if os.path.abspath(inner.cache.directory) != directory:
            raise TeacherCacheError(f"the model reads the teacher cache {inner.cache.directory}, "
                                    f"the arguments name {directory}")
        return model
    student = inner.student if isinstance(inner, CompatModel) else inner
    held = getattr(student, "_muscle_fast_cached", None)
    if held is not None and os.path.abspath(held.cache.directory) == directory:
        return held
    wrapped = CachedCompatModel(student, teacher_cache)
    object.__setattr__(student, "_muscle_fast_cached", wrapped)  # not a submodule
    return wrapped


def build_cached_compat_model(new_base: str | nn.Module, new_adapter: Any,
                              teacher_cache: str | os.PathLike | TeacherCache, *,
                              tokenizer: Any = None, **from_pretrained_kwargs) -> CachedCompatModel:
    """The student alone: the new base with the compatibility adapter (a trainable copy of the new
    task adapter ``new_adapter``: a directory or a ``PeftModel``), reading its teachers from
    ``teacher_cache``. Checks the base, the head and the task adapter (and ``tokenizer``, when
    given) against the cache's fingerprints."""
    import tempfile

    from peft import PeftModel

    cache = teacher_cache if isinstance(teacher_cache, TeacherCache) else TeacherCache(teacher_cache)
    if tokenizer is not None:
        cache.check_tokenizer(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = _adapter_path("new_adapter", new_adapter, tmp)
        base = _load_base(new_base, **from_pretrained_kwargs)
        student = PeftModel.from_pretrained(base, path, adapter_name=COMPAT_ADAPTER,
                                            is_trainable=True)
    model = CachedCompatModel(student, cache)  # checks the base and the head first
    fp = model_fingerprints(student)["adapter"]
    want = cache.manifest["models"]["new"]["adapter"]
    if want is not None and fp != want:
        raise TeacherCacheError(f"new_adapter is not the new task adapter the teacher cache "
                                f"{cache.directory} was built with")
    return model


# ------------------------------------------------------------------------------ the CLI


def _read_rows(path: str) -> list[dict]:
    if os.path.isdir(path):
        from datasets import load_from_disk

        ds = load_from_disk(path)
        return [ds[i] for i in range(len(ds))]
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TeacherCacheError(f"{path}:{n}: not JSON ({e})") from None
    return rows


def cache_teachers_main(args) -> int:
    """``muscle-fast cache-teachers``: load the two task models, build the cache."""
    from peft import PeftModel

    kw = {}
    if args.gguf_file:
        kw["gguf_file"] = args.gguf_file
    if args.dtype:
        kw["dtype"] = getattr(torch, args.dtype)
    rows = _read_rows(args.data)
    models = []
    for base, adapter in ((args.old_base, args.old_adapter), (args.new_base, args.new_adapter)):
        m = _load_base(base, **kw).to(args.device)
        if adapter:
            m = PeftModel.from_pretrained(m, adapter, is_trainable=False)
        models.append(m.eval())
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer, **({"gguf_file": args.gguf_file} if args.gguf_file else {}))
    build_teacher_cache(args.out, rows, old_model=models[0], new_model=models[1], kind=args.kind,
                        k=args.k, temperature=args.temperature, tokenizer=tokenizer,
                        batch_size=args.batch_size, rows_per_shard=args.rows_per_shard,
                        overwrite=args.overwrite, progress=not args.no_progress)
    return 0
