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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

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
]


@dataclass
class CompatArguments:
    """Options of the compatibility loss (see ``fused_compat_loss``); the paper's defaults."""

    mask: str = "muscle"
    temperature: float = 2.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    impl: str = "auto"
    inplace_backward: bool = True


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
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


class CompatModel(nn.Module):
    """Student (new base + compatibility adapter) with its two frozen teachers.

    ``forward`` runs the student (and, with ``return_teacher_logits=True``, both teachers first);
    :meth:`teacher_logits` runs both teachers under ``no_grad`` in eval mode. The old model stays
    in eval mode whatever ``train()`` is called.
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
                labels: Tensor | None = None, return_teacher_logits: bool = False, **kwargs):
        """The student's forward (labels are not used here: the loss is computed by
        :func:`compat_loss`). With ``return_teacher_logits``: ``(student_output, old_logits,
        new_logits)``, the teachers run first under ``no_grad``. One call through a DDP/FSDP
        wrapper then covers all three models: FSDP gathers the root's sharded parameters
        (embeddings, lm_heads) only around the root's forward."""
        teachers = self.teacher_logits(input_ids, attention_mask) if return_teacher_logits else None
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out if teachers is None else (out, *teachers)

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
        new_adapter: path of the new task adapter (a peft adapter directory).
        old_adapter: path of the old task adapter, or None when ``old_base`` is the whole old
            task model.
        old_tokenizer, new_tokenizer: when given, their vocabularies must agree token for token.

    Returns:
        CompatModel. Raises ValueError when the vocabularies differ.
    """
    from peft import PeftModel

    new = _load_base(new_base, **from_pretrained_kwargs)
    old = _load_base(old_base, **from_pretrained_kwargs)
    check_same_vocabulary(old, new, old_tokenizer, new_tokenizer)
    if old_adapter is not None:
        old = PeftModel.from_pretrained(old, old_adapter, is_trainable=False)
    student = PeftModel.from_pretrained(new, new_adapter, adapter_name=COMPAT_ADAPTER,
                                        is_trainable=True)
    student.load_adapter(new_adapter, adapter_name=TEACHER_ADAPTER, is_trainable=False)
    student.set_adapter(COMPAT_ADAPTER)  # active and trainable; the teacher stays frozen
    return CompatModel(student, old)


def compat_loss(model: CompatModel, inputs: dict, args: CompatArguments | None = None,
                num_items: None | int | Tensor = None, return_outputs: bool = False):
    """MUSCLE loss of one batch: teachers (no grad), student, causal shift, fused loss.

    ``logits[:, :-1]`` predicts ``labels[:, 1:]``; the shifted views go to ``fused_compat_loss``
    without copying. ``num_items`` (valid shifted labels over the whole accumulated batch) replaces
    the per-batch token count as the divisor, so accumulated gradients equal the big batch's.

    Returns ``(loss, stats)``, or ``(loss, stats, student_outputs)`` with ``return_outputs`` (with
    ``inplace_backward`` the student's logits hold the gradient after backward: do not read them).
    """
    args = args if args is not None else CompatArguments()
    input_ids, labels = inputs["input_ids"], inputs["labels"]
    attn = inputs.get("attention_mask")
    # one call through the wrapper (DDP, FSDP, or none): its hooks see teachers and student
    out, old, new = model(input_ids=input_ids, attention_mask=attn, return_teacher_logits=True)
    logits = out.logits
    loss, stats = fused_compat_loss(
        logits[:, :-1], labels[:, 1:], old[:, :-1], new[:, :-1],
        mask=args.mask, temperature=args.temperature, kl_weight=args.kl_weight,
        ce_weight=args.ce_weight, num_items=num_items, impl=args.impl,
        inplace_backward=args.inplace_backward and torch.is_grad_enabled(), return_stats=True)
    return (loss, stats, out) if return_outputs else (loss, stats)
