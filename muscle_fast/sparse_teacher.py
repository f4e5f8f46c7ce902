"""A teacher given by its top-k log-probabilities and a tail bucket (docs/SPEC.md section 2)."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Bytes of one chunk's float32 [rows, V] temporaries in from_logits (a few live at once).
CHUNK_BYTES = 64 << 20


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {t}")
    return t


def _check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must lie in {bound}, got {value}")
    return int(value)


class SparseTeacher:
    """A frozen teacher stored as, per token, its k most probable ids at temperature T, their
    log-probabilities, and the log of the mass outside them (a tail bucket).

    Equals, for teacher logits ``o`` [..., V] (``SparseTeacher.from_logits(o, k=k,
    temperature=T, labels=y)``)::

        lp = log_softmax(o.float() / T, -1)
        logprobs, indices = lp.topk(k, -1)                        # sorted, descending
        tail_logprob = lp.scatter(-1, indices, -inf).logsumexp(-1)  # -inf when k == V
        argmax = o.argmax(-1)                                      # T = 1, first index on ties
        label_logprob = log_softmax(o.float(), -1).gather(-1, y[..., None])[..., 0]  # 0: ignored

    It stands in for ``old_logits`` / ``new_logits`` in :func:`muscle_fast.fused_compat_loss` and
    :func:`muscle_fast.fused_linear_compat_loss` (there without any teacher GEMM); the loss is
    then the exact KL over the k ids and the tail bucket (docs/SPEC.md section 2). It indexes
    and reshapes like a tensor of its leading shape, so callers shift as with logits:
    ``teacher[:, :-1]`` goes with ``logits[:, :-1]`` and ``labels[:, 1:]``. Its stored
    ``labels`` (for the likelihood masks) slice along, so build it with the labels each position
    predicts (``from_logits(o[:, :-1], labels=y[:, 1:])``): the loss checks them against its own.

    Args:
        indices: [..., k] int32 vocabulary ids, distinct per token.
        logprobs: [..., k] float32 log-probabilities of ``indices`` at ``temperature``.
        tail_logprob: [...] float32 log of the probability outside ``indices`` (``-inf``: none).
        argmax: [...] int64 the teacher's first-index argmax at temperature 1 (``"old_correct"``
            mask, ``acc_old`` / ``acc_new``).
        temperature: the T of ``logprobs``; the loss refuses a teacher of another T.
        vocab_size: V, the vocabulary the ids index.
        label_logprob: [...] float32 ``log_softmax(o)[label]`` at T = 1 (the likelihood masks),
            0 at ignored tokens, or None.
        labels: [...] int64, the labels ``label_logprob`` was taken at (the loss checks them
            against its own with ``validate=True``), or None.
        validate: check that ids lie in ``[0, vocab_size)`` (reads the values: one host sync on
            a GPU).

    Shape:
        ``teacher.shape`` is the leading shape (``tail_logprob.shape``); ``teacher.k`` the ids
        per token.
    """

    __slots__ = ("indices", "logprobs", "tail_logprob", "argmax", "label_logprob", "labels",
                 "temperature", "vocab_size")

    def __init__(self, indices: Tensor, logprobs: Tensor, tail_logprob: Tensor, argmax: Tensor,
                 *, temperature: float, vocab_size: int, label_logprob: Optional[Tensor] = None,
                 labels: Optional[Tensor] = None, validate: bool = True):
        temperature = _check_temperature(temperature)
        vocab_size = _check_int("vocab_size", vocab_size, 1)
        fields = {"indices": (indices, torch.int32), "logprobs": (logprobs, torch.float32),
                  "tail_logprob": (tail_logprob, torch.float32), "argmax": (argmax, torch.int64),
                  "label_logprob": (label_logprob, torch.float32), "labels": (labels, torch.int64)}
        for name, (x, dtype) in fields.items():
            if x is None and name in ("label_logprob", "labels"):
                continue
            if not isinstance(x, Tensor):
                raise TypeError(f"SparseTeacher.{name} must be a torch.Tensor, got "
                                f"{type(x).__name__}")
            if x.dtype != dtype:
                raise TypeError(f"SparseTeacher.{name} must be {dtype}, got {x.dtype}")
            if x.device != indices.device:
                raise ValueError(f"SparseTeacher.{name} is on {x.device} but indices is on "
                                 f"{indices.device}")
            if x.requires_grad:
                raise ValueError(f"SparseTeacher.{name} requires grad: a teacher is frozen "
                                 f"(pass {name}.detach())")
        if indices.dim() < 1:
            raise ValueError("SparseTeacher.indices must be [..., k], got a 0-dim tensor")
        lead, k = indices.shape[:-1], indices.shape[-1]
        _check_int("k (indices.shape[-1])", k, 1, vocab_size)
        if logprobs.shape != indices.shape:
            raise ValueError(f"SparseTeacher.logprobs has shape {tuple(logprobs.shape)}, "
                             f"expected {tuple(indices.shape)} like indices")
        for name in ("tail_logprob", "argmax", "label_logprob", "labels"):
            x = fields[name][0]
            if x is not None and x.shape != lead:
                raise ValueError(f"SparseTeacher.{name} has shape {tuple(x.shape)}, expected "
                                 f"{tuple(lead)} (indices without its last dimension)")
        if labels is not None and label_logprob is None:
            raise ValueError("SparseTeacher.labels was given without label_logprob")
        if validate and indices.numel() and not torch.compiler.is_compiling():
            low, high = indices.min(), indices.max()
            low, high = torch.stack([low, high]).tolist()
            if low < 0 or high >= vocab_size:
                raise ValueError(f"SparseTeacher.indices must lie in [0, {vocab_size}), found "
                                 f"{low if low < 0 else high}")
        self._set(indices, logprobs, tail_logprob, argmax, label_logprob, labels, temperature,
                  vocab_size)

    def _set(self, indices, logprobs, tail_logprob, argmax, label_logprob, labels, temperature,
             vocab_size):
        self.indices, self.logprobs, self.tail_logprob = indices, logprobs, tail_logprob
        self.argmax, self.label_logprob, self.labels = argmax, label_logprob, labels
        self.temperature, self.vocab_size = temperature, vocab_size

    @classmethod
    def _unchecked(cls, *tensors, temperature, vocab_size) -> "SparseTeacher":
        t = cls.__new__(cls)
        t._set(*tensors, temperature, vocab_size)
        return t

    # ------------------------------------------------------------------ building

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: Tensor, *, k: int, temperature: float = 2.0,
                    labels: Optional[Tensor] = None, ignore_index: int = -100,
                    chunk_size: Optional[int] = None) -> "SparseTeacher":
        """The sparse form of the teacher ``logits`` [..., V] (see the class docstring).

        Args:
            logits: the teacher's logits [..., V], any float dtype (computed in float32, float64
                for float64 logits; stored as float32). Not differentiated.
            k: ids kept per token, in ``[1, V]``.
            temperature: the T of the loss this teacher will serve (the loss's default is 2.0).
            labels: [...] int ids (``logits[i]`` predicts ``labels[i]``, as for the loss) to also
                store ``label_logprob`` for the likelihood masks; ``ignore_index`` tokens get 0.
            chunk_size: tokens per chunk (None: chunks of about 64 MiB of float32 [tokens, V]
                temporaries), so memory beyond the result is bounded for any number of tokens.

        Returns:
            A :class:`SparseTeacher` on the logits' device, of leading shape ``logits.shape[:-1]``.
        """
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if logits.dim() < 1 or not logits.dtype.is_floating_point:
            raise TypeError(f"logits must be a float tensor [..., V], got {logits.dtype} of "
                            f"shape {tuple(logits.shape)}")
        vocab = logits.shape[-1]
        if vocab == 0:
            raise ValueError("logits has an empty vocabulary dimension")
        k = _check_int("k", k, 1, vocab)
        temperature = _check_temperature(temperature)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        lead = logits.shape[:-1]
        n = lead.numel()
        x = logits.detach().reshape(n, vocab)
        y = None
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or \
                    labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError("labels must be an integer tensor, got "
                                f"{getattr(labels, 'dtype', type(labels).__name__)}")
            if labels.shape != lead:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected "
                                 f"{tuple(lead)} (logits without its last dimension)")
            if labels.device != logits.device:
                raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
            y = labels.reshape(n).to(torch.int64)
            bad = ((y < 0) | (y >= vocab)) & (y != ignore_index)
            if n and bool(bad.any()):
                raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                                 f"{ignore_index}; found {y[bad][0].item()}")
        if chunk_size is None:
            chunk_size = max(1, CHUNK_BYTES // (4 * vocab))
        else:
            chunk_size = _check_int("chunk_size", chunk_size, 1)
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        dev = logits.device
        indices = torch.empty((n, k), dtype=torch.int32, device=dev)
        logprobs = torch.empty((n, k), dtype=torch.float32, device=dev)
        tail = torch.empty(n, dtype=torch.float32, device=dev)
        argmax = torch.empty(n, dtype=torch.int64, device=dev)
        label_lp = None if y is None else torch.zeros(n, dtype=torch.float32, device=dev)
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            xc = x[s:e].to(compute)
            lp = F.log_softmax(xc / temperature, dim=-1)
            top = lp.topk(k, dim=-1, sorted=True)
            indices[s:e] = top.indices
            logprobs[s:e] = top.values
            # the tail as a logsumexp of its own terms: 1 - sum(top) cancels
            tail[s:e] = lp.scatter_(-1, top.indices, float("-inf")).logsumexp(-1)
            del lp
            argmax[s:e] = xc.argmax(-1)
            if y is not None:
                yc = y[s:e]
                valid = yc != ignore_index
                at = F.log_softmax(xc, dim=-1).gather(1, torch.where(valid, yc, 0)[:, None])
                label_lp[s:e] = torch.where(valid, at[:, 0], 0)
        def shaped(t):
            return None if t is None else t.reshape(*lead, *t.shape[1:])
        return cls._unchecked(shaped(indices), shaped(logprobs), shaped(tail), shaped(argmax),
                              shaped(label_lp), None if y is None else shaped(y),
                              temperature=temperature, vocab_size=vocab)

    # ------------------------------------------------------------------ tensor-like

    @property
    def shape(self) -> torch.Size:
        """The leading shape (tokens), without k."""
        return self.tail_logprob.shape

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def dim(self) -> int:
        return self.tail_logprob.dim()

    def numel(self) -> int:
        return self.tail_logprob.numel()

    def __len__(self) -> int:
        return len(self.tail_logprob)

    def _map(self, per_token, per_id) -> "SparseTeacher":
        """A new teacher with ``per_id`` applied to indices/logprobs, ``per_token`` to the rest."""
        def tok(x):
            return None if x is None else per_token(x)
        return SparseTeacher._unchecked(
            per_id(self.indices), per_id(self.logprobs), tok(self.tail_logprob), tok(self.argmax),
            tok(self.label_logprob), tok(self.labels), temperature=self.temperature,
            vocab_size=self.vocab_size)

    def __getitem__(self, key) -> "SparseTeacher":
        """Index the leading dimensions like a tensor of shape ``self.shape``."""
        key_t = key if isinstance(key, tuple) else (key,)
        # an Ellipsis or a short key leaves the k dimension of the per-id tensors alone
        return self._map(lambda x: x[key], lambda x: x[key_t + (slice(None),)])

    def reshape(self, *shape) -> "SparseTeacher":
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        new = self.tail_logprob.reshape(shape).shape
        return self._map(lambda x: x.reshape(new), lambda x: x.reshape(*new, x.shape[-1]))

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "SparseTeacher":
        return self.reshape(self.tail_logprob.flatten(start_dim, end_dim).shape)

    def to(self, device, non_blocking: bool = False) -> "SparseTeacher":
        """The same teacher on ``device`` (dtypes are part of the format and never change)."""
        if isinstance(device, torch.dtype):
            raise TypeError("SparseTeacher.to takes a device; its dtypes are fixed")
        def move(x):
            return x.to(device=device, non_blocking=non_blocking)
        return self._map(move, move)

    def cpu(self) -> "SparseTeacher":
        return self.to("cpu")

    def contiguous(self) -> "SparseTeacher":
        return self._map(Tensor.contiguous, Tensor.contiguous)

    def __repr__(self) -> str:
        extra = "" if self.label_logprob is None else ", with label_logprob"
        return (f"SparseTeacher(shape={tuple(self.shape)}, k={self.k}, "
                f"vocab_size={self.vocab_size}, temperature={self.temperature}, "
                f"device={self.device}{extra})")

    # ------------------------------------------------------------------ the loss's checks

    def check_for_loss(self, name: str, lead: torch.Size, vocab: int, device,
                       temperature: float, label_masks: bool) -> None:
        """The loss's checks of this teacher as its ``name`` argument (docs/SPEC.md section 3)."""
        if self.shape != lead and self.shape != (lead.numel(),):
            raise ValueError(f"{name} is a SparseTeacher of shape {tuple(self.shape)}, expected "
                             f"{tuple(lead)} (or [{lead.numel()}]) like the labels")
        if self.vocab_size != vocab:
            raise ValueError(f"{name} is a SparseTeacher of vocab_size {self.vocab_size}, the "
                             f"student has {vocab} (MUSCLE needs one tokenizer: teachers and "
                             "student share the vocabulary)")
        if self.device != device:
            raise ValueError(f"{name} is on {self.device} but the student is on {device}")
        if self.temperature != temperature:
            raise ValueError(f"{name} is a SparseTeacher built at temperature "
                             f"{self.temperature}, the loss runs at temperature={temperature}: "
                             "its stored probabilities are those of another distribution; "
                             f"build it with SparseTeacher.from_logits(..., "
                             f"temperature={temperature})")
        if label_masks and self.label_logprob is None:
            raise ValueError(f"{name} is a SparseTeacher built without labels: the likelihood "
                             "masks need its label_logprob; build it with "
                             "SparseTeacher.from_logits(..., labels=labels)")


LIKELIHOOD_MASKS = ("token_likelihood", "sequence_likelihood")


def check_sparse_teachers(old, new, opts, lead: torch.Size, vocab: int, device) -> Optional[dict]:
    """The public losses' checks of their sparse teachers (``opts``: the checked options).
    Returns the value checks for ``check_values``' one sync (None when there are none)."""
    label_masks = opts.mask_name in LIKELIHOOD_MASKS
    for name, t in (("old_logits", old), ("new_logits", new)):
        if isinstance(t, SparseTeacher):
            t.check_for_loss(name, lead, vocab, device, opts.temperature,
                             label_masks and name == "old_logits")
    if label_masks and isinstance(old, SparseTeacher) and old.labels is not None:
        differ = opts.valid & (old.labels.reshape(-1) != opts.labels)
        return {"old_logits.labels": (
            differ.any(), "old_logits is a SparseTeacher whose label_logprob was taken at other "
            "labels than the loss's (a shift done on one side only?); build it with the labels "
            "the loss gets")}
    return None


__all__ = ["SparseTeacher"]
