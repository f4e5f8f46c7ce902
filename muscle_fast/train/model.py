"""The MUSCLE model assembly: one new base, two LoRA adapters on it, and the frozen old model.

::

    student    = new base + "default" adapter  (the compatibility adapter, trainable,
                                                initialised as a copy of the new task adapter)
    new teacher = new base + "teacher" adapter (the new task adapter, frozen)  -- same base weights
    old teacher = old base + old task adapter  (frozen, eval mode)

The compatibility adapter is peft's ``"default"`` adapter, so ``save_pretrained`` writes a plain
peft adapter directory that ``PeftModel.from_pretrained(new_base, path)`` loads.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muscle_fast._checks import check_stored_options
from muscle_fast.linear import fused_linear_compat_loss
from muscle_fast.loss import fused_compat_loss

COMPAT_ADAPTER = "default"
TEACHER_ADAPTER = "teacher"

__all__ = [
    "COMPAT_ADAPTER",
    "TEACHER_ADAPTER",
    "CompatArguments",
    "CompatModel",
    "build_compat_model",
    "check_same_vocabulary",
    "compat_loss",
    "train_chunk_size",
]

#: Budget of one chunk's float32 logits (student + both teachers) in the fused training loss.
#: On the CPU it keeps a step's peak at or under 1/8 of the materialised step's at 4096 tokens,
#: V=32000 (benchmarks/results/train_memory_cpu.jsonl); on CUDA larger chunks keep the GEMMs busy.
TRAIN_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}
#: Fewest tokens a chunk has. Each chunk's head GEMMs read (and pack) the whole [V, H] head
#: weight again, a cost per chunk that does not shrink with the chunk, so a chunk of few tokens
#: pays it for little work: at V=128256 a 21-token chunk made the step 1.10-1.20x the
#: materialised one, 43-128 tokens 0.92-0.98x (benchmarks/NOTES.md, "Training step").
MIN_CHUNK_TOKENS = 64


def train_chunk_size(vocab: int, device: torch.device) -> int:
    """Tokens per chunk of the fused training loss: three models' fp32 chunk logits fit
    ``TRAIN_CHUNK_BYTES``, but at least ``MIN_CHUNK_TOKENS`` (the budget decides up to V = 43690
    on the CPU, 349525 on CUDA; above that a chunk is 64 tokens and its logits 768 B x V)."""
    budget = TRAIN_CHUNK_BYTES.get(torch.device(device).type, TRAIN_CHUNK_BYTES["cuda"])
    return max(MIN_CHUNK_TOKENS, budget // (3 * 4 * max(int(vocab), 1)))


@dataclass
class CompatArguments:
    """Options of the compatibility loss (see ``fused_compat_loss``); the paper's defaults.

    ``fused_linear=True`` (default): each model runs to its last hidden states and the loss is
    ``fused_linear_compat_loss`` on the output heads, in chunks of ``chunk_size`` tokens (None:
    :func:`train_chunk_size`); no [batch, seq, vocab] logits exist in a training step. A head that
    is not a plain linear map of the last hidden state (LoRA on the head, soft-capping, a logit
    scale, ...) falls back to the materialised path, with a one-time warning naming the reason.
    ``fused_linear=False``: the materialised path, ``fused_compat_loss`` on full logits
    (``inplace_backward`` applies to it only).

    ``teacher_cache=DIR``: the teachers come from a cache built by ``build_teacher_cache`` /
    ``muscle-fast cache-teachers`` (``muscle_fast.train.cache``); the model needs only the new
    base + compatibility adapter (a peft model, or a ``CachedCompatModel``), no old model.
    """

    mask: str = "muscle"
    temperature: float = 2.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    impl: str = "auto"
    inplace_backward: bool = True
    fused_linear: bool = True
    chunk_size: int | None = None
    teacher_cache: str | os.PathLike | None = None

    def __post_init__(self):
        # the loss's own checks, here where the options are written (before any model loads)
        check_stored_options(fused_compat_loss, {
            "mask": self.mask, "temperature": self.temperature, "kl_weight": self.kl_weight,
            "ce_weight": self.ce_weight, "impl": self.impl,
            "inplace_backward": self.inplace_backward, "fused_linear": self.fused_linear,
            "chunk_size": self.chunk_size})


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        # a ZeRO-3 partitioned weight (zero.Init) is (0,) here; ds_shape is its whole shape
        return int(getattr(emb.weight, "ds_shape", emb.weight.shape)[0])
    return int(model.config.vocab_size)


def check_same_vocabulary(old_model: nn.Module, new_model: nn.Module,
                          old_tokenizer: Any = None, new_tokenizer: Any = None) -> None:
    """Raise ``ValueError`` unless old and new share one vocabulary (and tokenizer, when given).

    MUSCLE distils per token over the vocabulary, so it needs one tokenizer for both models: the
    paper states this as its limitation.
    """
    v_old, v_new = _vocab_size(old_model), _vocab_size(new_model)
    if v_old != v_new:
        raise ValueError(
            f"old model has a vocabulary of {v_old} tokens, new model {v_new}: MUSCLE needs old and "
            "new models to share one tokenizer and vocabulary (a limitation of the method)")
    if (old_tokenizer is None) != (new_tokenizer is None):
        raise ValueError("give both old_tokenizer and new_tokenizer, or neither")
    if old_tokenizer is not None and old_tokenizer.get_vocab() != new_tokenizer.get_vocab():
        o, n = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
        diff = sorted(set(o.items()) ^ set(n.items()), key=str)[:5]
        raise ValueError(
            "old and new tokenizers map tokens to different ids (e.g. "
            f"{diff}): MUSCLE needs old and new models to share one tokenizer and vocabulary")


@contextlib.contextmanager
def _adapter(peft_model: nn.Module, name: str):
    """Route every LoRA layer through adapter ``name`` without touching ``requires_grad``
    (peft's ``set_adapter`` would flip it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    try:
        for m in layers:
            m._active_adapter = [name]
        yield
    finally:
        for m, s in zip(layers, saved):
            m._active_adapter = s


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _output_head(model: nn.Module):
    model = _unwrap(model)
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _head_problem(model: nn.Module) -> str | None:
    """Why ``model``'s logits may not be ``F.linear(last_hidden, head.weight, head.bias)``, read
    from its structure and config; None when nothing says so (the probe then checks the values)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = _output_head(model)
    if head is None:
        return "the model has no output head (get_output_embeddings() is None)"
    if isinstance(head, BaseTunerLayer):
        return f"a peft adapter layer (LoRA) on the output head ({type(head).__name__})"
    if not isinstance(head, nn.Linear):
        return f"the output head is a {type(head).__name__}, not an nn.Linear"
    if "forward" in vars(head) or hasattr(head, "_hf_hook"):
        return "the output head's forward is replaced by a hook (accelerate device_map/offload)"
    cfg = getattr(_unwrap(model), "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap:
        return f"final_logit_softcapping={softcap} (Gemma-2 style tanh soft-capping of the logits)"
    for name in ("logit_scale", "logits_scaling"):
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and v != 1:
            return f"{name}={v} (the logits are scaled after the head)"
    return None


@contextlib.contextmanager
def _head_forward(head: nn.Module, fn):
    """Run ``fn`` as ``head``'s forward: calls still go through ``head.__call__``, so the hooks of
    a wrapper (FSDP2's all-gather of a sharded weight) run around it."""
    head.forward = fn
    try:
        yield
    finally:
        del head.forward


class CompatModel(nn.Module):
    """Student (new base + compatibility adapter) with its two frozen teachers.

    ``forward`` runs the student (and, with ``return_teacher_logits=True``, both teachers first),
    or with ``compat_args`` the whole training loss (see :func:`compat_loss`);
    :meth:`teacher_logits` runs both teachers under ``no_grad`` in eval mode. The old model stays
    in eval mode whatever ``train()`` is called.

    The fused loss needs each model's logits to be ``F.linear(last_hidden, head.weight,
    head.bias)``. That is decided once, at the first fused call: from the heads' types and the
    configs (a peft layer on the head, ``final_logit_softcapping``, ``logit_scale``, ...), then by
    a probe that runs each model on 8 fixed tokens and compares its logits with its head's
    ``F.linear``, value for value. Otherwise the materialised path runs, with one warning.
    """

    # read by transformers.Trainer: it counts num_items_in_batch over labels[..., 1:] (causal
    # shift) and passes it to compute_loss
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"

    def __init__(self, student: nn.Module, old_model: nn.Module):
        super().__init__()
        if TEACHER_ADAPTER not in student.peft_config or COMPAT_ADAPTER not in student.peft_config:
            raise ValueError(f"student needs the adapters {COMPAT_ADAPTER!r} (compatibility) and "
                             f"{TEACHER_ADAPTER!r} (frozen new task adapter)")
        check_same_vocabulary(old_model, student)
        self.student = student
        self.old_model = old_model
        self.config = student.config
        self._fused_reason: str | None = None  # "" once the fused path is known to be exact
        for p in old_model.parameters():
            p.requires_grad_(False)
        for n, p in student.named_parameters():
            if f".{TEACHER_ADAPTER}." in n:
                p.requires_grad_(False)
        old_model.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.old_model.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, return_teacher_logits: bool = False,
                compat_args: CompatArguments | None = None,
                num_items: None | int | Tensor = None, **kwargs):
        """The student's forward (labels are not used here: the loss is computed by
        :func:`compat_loss`). With ``return_teacher_logits``: ``(student_output, old_logits,
        new_logits)``, the teachers run first under ``no_grad``. With ``compat_args`` (and
        ``labels``): the fused training loss ``(loss, stats, None)`` (or, where a head rules the
        fused path out, the materialised one's ``(loss, stats, student_output)``). One call through
        a DDP/FSDP wrapper then covers all three models: FSDP gathers the root's sharded parameters
        (embeddings, lm_heads) only around the root's forward, and a separately sharded head only
        around its own forward, inside which the fused loss runs."""
        if compat_args is not None:
            if labels is None:
                raise ValueError("compat_args needs labels")
            if self._fused_problem(input_ids.device) is None:
                return self._fused_loss(input_ids, attention_mask, labels, compat_args, num_items,
                                        **kwargs)
            return_teacher_logits = True
        teachers = self.teacher_logits(input_ids, attention_mask) if return_teacher_logits else None
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if compat_args is not None:
            loss, stats = _materialised_loss(out.logits, *teachers, labels, compat_args, num_items)
            return loss, stats, out
        return out if teachers is None else (out, *teachers)

    def _fused_problem(self, device) -> str | None:
        """Why the fused loss cannot run on these models (None: it can); decided once, with a
        one-time warning. Every rank decides the same: the probe input is fixed."""
        if self._fused_reason is None:
            reason = None
            for name, model in (("student", self.student), ("old", self.old_model)):
                reason = _head_problem(model) or self._probe(model, device)
                if reason is not None:
                    reason = f"{name} model: {reason}"
                    warnings.warn(
                        f"muscle_fast: the fused training loss (CompatArguments.fused_linear) is off "
                        f"because of the {reason}; training steps materialise [batch, seq, vocab] "
                        "logits (CompatArguments(fused_linear=False) selects that path explicitly)",
                        stacklevel=4)
                    break
            self._fused_reason = reason or ""
        return self._fused_reason or None

    @torch.no_grad()
    def _probe(self, model: nn.Module, device) -> str | None:
        """Run ``model`` on 8 fixed tokens with its head's forward replaced exactly as the fused
        path replaces it; its logits must be that head's ``F.linear`` output, value for value."""
        head = _output_head(model)
        seen = {}

        def linear(h):
            seen["z"] = F.linear(h, head.weight, head.bias)
            return seen["z"]

        ids = (torch.arange(8, device=device) % int(head.out_features)).unsqueeze(0)
        with _head_forward(head, linear):
            logits = model(input_ids=ids).logits
        z = seen.get("z")
        if z is None:
            return "its forward does not call the output head"
        if logits.shape != z.shape or not torch.equal(logits, z.to(logits.dtype)):
            return ("its logits are not its output head's F.linear(hidden, weight, bias) "
                    "(a transform after the head)")
        return None

    def _fused_loss(self, input_ids, attention_mask, labels, args, num_items, **kwargs):
        head, old_head = _output_head(self.student), _output_head(self.old_model)
        hidden = {}

        def keep(name):
            def forward(h):
                hidden[name] = h
                return h.new_zeros((*h.shape[:-1], 0))  # the model's "logits": nothing of V
            return forward

        with torch.no_grad():
            with _head_forward(old_head, keep("old")):
                self.old_model(input_ids=input_ids, attention_mask=attention_mask)
            was_training = self.student.training
            self.student.eval()
            try:
                with _adapter(self.student, TEACHER_ADAPTER), _head_forward(head, keep("new")):
                    self.student(input_ids=input_ids, attention_mask=attention_mask)
            finally:
                self.student.train(was_training)

        result = {}

        def student_head(h):
            # called as head(h): this head's weight is gathered now; the old head's forward, called
            # inside, gathers the old weight, so the loss below sees both whole
            def old_head_forward(_):
                result["loss"] = _fused_linear_loss(h, head, hidden["old"], old_head,
                                                    hidden["new"], labels, args, num_items)
                return h.new_zeros((0,))

            with _head_forward(old_head, old_head_forward):
                old_head(hidden["old"][:0])
            loss = result["loss"][0]
            # the model's "logits", empty but on the loss's graph (DDP's unused-parameter search)
            return loss.reshape(1, 1, 1).expand(*h.shape[:-1], 0)

        with _head_forward(head, student_head):
            self.student(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        loss, stats = result["loss"]
        return loss, stats, None

    @torch.no_grad()
    def teacher_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None):
        """``(old_logits, new_logits)``, each [B, T, V], from the frozen teachers in eval mode."""
        old = self.old_model(input_ids=input_ids, attention_mask=attention_mask).logits
        was_training = self.student.training
        self.student.eval()
        try:
            with _adapter(self.student, TEACHER_ADAPTER):
                new = self.student(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self.student.train(was_training)
        return old, new

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Recompute the student's layers in its backward: ``TrainingArguments(
        activation_checkpointing=True)`` (formerly ``gradient_checkpointing``) calls this. The
        teachers run under ``no_grad`` and keep no activations."""
        self.student.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        self.student.activation_checkpointing_disable()

    def compat_parameters(self):
        """The trainable parameters: those of the compatibility adapter."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def save_pretrained(self, path, **kwargs) -> None:
        """Write only the compatibility adapter, as a plain peft adapter directory."""
        self.student.save_pretrained(str(path), selected_adapters=[COMPAT_ADAPTER], **kwargs)

    def load_compat_weights(self, path) -> None:
        """Load compatibility-adapter weights written by :meth:`save_pretrained` (resuming)."""
        import os

        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        f = os.path.join(str(path), "adapter_model.safetensors")
        if not os.path.exists(f):
            raise FileNotFoundError(f"no adapter_model.safetensors in {path}")
        result = set_peft_model_state_dict(self.student, load_file(f), adapter_name=COMPAT_ADAPTER)
        missing = [k for k in getattr(result, "unexpected_keys", [])]
        if missing:
            raise ValueError(f"{f} holds weights the compatibility adapter lacks: {missing[:5]}")


def _load_base(base: str | nn.Module, **kwargs) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, **kwargs)


def build_compat_model(
    new_base: str | nn.Module,
    new_adapter: str,
    old_base: str | nn.Module,
    old_adapter: str | None = None,
    *,
    old_tokenizer: Any = None,
    new_tokenizer: Any = None,
    **from_pretrained_kwargs,
) -> CompatModel:
    """Assemble MUSCLE's student and teachers with peft.

    The new base is loaded once; the new task adapter is attached twice on it: as the frozen
    ``"teacher"`` adapter and as the trainable ``"default"`` (compatibility) adapter, a copy of
    it. The old model is the old base with the old adapter (if given), frozen, in eval mode.

    Args:
        new_base, old_base: a transformers causal LM or a name/path for
            ``AutoModelForCausalLM.from_pretrained`` (with ``from_pretrained_kwargs``).
        new_adapter: the new task adapter: a peft adapter directory, or a ``PeftModel`` (its
            active adapter's weights are used, on ``new_base``). A ``PeftModel`` made on the
            ``new_base`` object itself is unloaded from it (``unload()``, after its weights are
            copied): the base then carries the student's two adapters only.
        old_adapter: the old task adapter (a directory or a ``PeftModel``, on ``old_base``), or
            None when ``old_base`` is the whole old task model. A ``PeftModel`` made on the
            ``old_base`` object itself is the old model as it is (frozen, in eval mode).
        old_tokenizer, new_tokenizer: when given, their vocabularies must agree token for token.

    Returns:
        CompatModel. Raises ValueError when the vocabularies differ, TypeError naming the
        argument for an adapter that is neither a path nor a ``PeftModel``.
    """
    from peft import PeftModel

    new_adapter_model, old_adapter_model = new_adapter, old_adapter
    with tempfile.TemporaryDirectory() as tmp:
        new_adapter = _adapter_path("new_adapter", new_adapter, tmp)
        old_adapter = _adapter_path("old_adapter", old_adapter, tmp, optional=True)
        new = _load_base(new_base, **from_pretrained_kwargs)
        old = _load_base(old_base, **from_pretrained_kwargs)
        check_same_vocabulary(old, new, old_tokenizer, new_tokenizer)
        if _wraps(old_adapter_model, old):  # already the old task model: use it as it is
            old = old_adapter_model
        elif old_adapter is not None:
            old = PeftModel.from_pretrained(old, old_adapter, is_trainable=False)
        if _wraps(new_adapter_model, new):
            # its weights are saved above; the base must carry the student's adapters only, not a
            # second set of LoRA layers (peft warns "Already found a `peft_config` attribute")
            new_adapter_model.unload()
        student = PeftModel.from_pretrained(new, new_adapter, adapter_name=COMPAT_ADAPTER,
                                            is_trainable=True)
        student.load_adapter(new_adapter, adapter_name=TEACHER_ADAPTER, is_trainable=False)
    student.set_adapter(COMPAT_ADAPTER)  # active and trainable; the teacher stays frozen
    return CompatModel(student, old)


def _wraps(adapter, base: nn.Module) -> bool:
    """``adapter`` is a ``PeftModel`` made on the very ``base`` object (its LoRA layers are in it)."""
    from peft import PeftModel

    return isinstance(adapter, PeftModel) and adapter.get_base_model() is base


def _adapter_path(name: str, adapter, tmp: str, optional: bool = False):
    """A peft adapter directory for ``adapter``: a path as given, or a ``PeftModel`` (its active
    adapter) written under ``tmp``."""
    from peft import PeftModel

    if adapter is None and optional:
        return None
    if isinstance(adapter, (str, os.PathLike)):
        return os.fspath(adapter)
    if isinstance(adapter, PeftModel):
        path = os.path.join(tmp, name)
        adapter.save_pretrained(path, selected_adapters=[adapter.active_adapter])
        sub = os.path.join(path, adapter.active_adapter)  # peft nests a non-default adapter
        return sub if not os.path.exists(os.path.join(path, "adapter_config.json")) else path
    raise TypeError(f"{name} must be a peft adapter directory (str or os.PathLike) or a "
                    f"peft.PeftModel, got {type(adapter).__name__}")


def _batch_labels(inputs: dict) -> Tensor:
    labels = inputs.get("labels") if isinstance(inputs, dict) else None
    if labels is None:
        raise ValueError("the batch needs 'labels' (unshifted token ids, -100 where ignored) beside "
                         "'input_ids': MUSCLE's loss is per labelled token")
    return labels


def _materialised_loss(logits, old, new, labels, args, num_items):
    return fused_compat_loss(
        logits[:, :-1], labels[:, 1:], old[:, :-1], new[:, :-1],
        mask=args.mask, temperature=args.temperature, kl_weight=args.kl_weight,
        ce_weight=args.ce_weight, num_items=num_items, impl=args.impl,
        inplace_backward=args.inplace_backward and torch.is_grad_enabled(), return_stats=True)


def _head_operands(h: Tensor, head: nn.Linear):
    w, b = head.weight, head.bias
    if w.dtype != h.dtype:  # autocast: F.linear would run the GEMM in the activations' dtype
        w, b = w.to(h.dtype), None if b is None else b.to(h.dtype)
    return w, b


def _fused_linear_loss(h, head, old_h, old_head, new_h, labels, args, num_items):
    """``fused_linear_compat_loss`` of the shifted hidden states on the student's head (the new
    teacher's too: one base) and the old model's head."""
    w, b = _head_operands(h, head)
    ow, ob = _head_operands(old_h, old_head)
    nw, nb = (w, b) if new_h.dtype == h.dtype else _head_operands(new_h, head)
    chunk = args.chunk_size if args.chunk_size is not None else train_chunk_size(w.shape[0], h.device)
    with torch.autocast(h.device.type, enabled=False):  # the loss's GEMMs are its own (fp32 out)
        return fused_linear_compat_loss(
            h[:, :-1], w, labels[:, 1:], bias=b,
            old_hidden=old_h[:, :-1], old_weight=ow, old_bias=ob,
            new_hidden=new_h[:, :-1], new_weight=nw, new_bias=nb,
            chunk_size=chunk, mask=args.mask, temperature=args.temperature,
            kl_weight=args.kl_weight, ce_weight=args.ce_weight, num_items=num_items,
            impl=args.impl, return_stats=True)


def compat_loss(model: CompatModel, inputs: dict, args: CompatArguments | None = None,
                num_items: None | int | Tensor = None, return_outputs: bool = False):
    """MUSCLE loss of one batch: teachers (no grad), student, causal shift, fused loss.

    The last hidden state at ``t`` predicts ``labels[:, t + 1]``. With ``args.fused_linear``
    (default) the loss is ``fused_linear_compat_loss`` on the three models' last hidden states
    and output heads (no [B, T, V] logits); with ``fused_linear=False``, or where a head is not a
    plain linear map (a one-time warning says why), ``fused_compat_loss`` on the full logits.
    ``num_items`` (valid shifted labels over the whole accumulated batch) replaces the per-batch
    token count as the divisor, so accumulated gradients equal the big batch's.

    Returns ``(loss, stats)``, or ``(loss, stats, student_outputs)`` with ``return_outputs``
    (``None`` on the fused path, which computes no logits; with ``inplace_backward`` the
    materialised path's logits hold the gradient after backward: do not read them).
    """
    args = args if args is not None else CompatArguments()
    labels = _batch_labels(inputs)
    if args.teacher_cache is not None:
        from .cache import cached_model

        model = cached_model(model, args.teacher_cache)
    input_ids = inputs["input_ids"]
    attn = inputs.get("attention_mask")
    # one call through the wrapper (DDP, FSDP, or none): its hooks see teachers and student
    if args.fused_linear:
        loss, stats, out = model(input_ids=input_ids, attention_mask=attn, labels=labels,
                                 compat_args=args, num_items=num_items)
    else:
        out, old, new = model(input_ids=input_ids, attention_mask=attn, labels=labels,
                              return_teacher_logits=True)
        loss, stats = _materialised_loss(out.logits, old, new, labels, args, num_items)
    return (loss, stats, out) if return_outputs else (loss, stats)
