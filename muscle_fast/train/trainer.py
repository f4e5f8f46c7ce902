"""``CompatTrainer``: transformers.Trainer training the compatibility adapter with MUSCLE's loss."""
from __future__ import annotations

import contextlib
import copy
import os

import torch
from transformers import Trainer

from .model import CompatArguments, CompatModel, compat_loss

__all__ = ["CompatTrainer"]

_STAT_FIELDS = ("frac_to_old", "acc_student", "acc_old", "acc_new", "kl_old", "kl_new", "ce")


class CompatTrainer(Trainer):
    """Trains ``CompatModel``'s compatibility adapter; the teachers stay frozen.

    Batches are dicts with ``input_ids``, ``labels`` (unshifted, ``-100`` where ignored) and
    optionally ``attention_mask``. Training steps (and evaluation that keeps only the loss) run the
    loss of ``compat_args`` (by default fused: no [batch, seq, vocab] logits); ``predict`` and
    evaluation with ``compute_metrics`` run the materialised path, which returns the logits. Logs
    ``compat/<stat>`` (token-weighted means over the logging interval of the loss's stats, over
    the tokens of every data parallel rank) beside the loss. Checkpoints and the final save hold
    only the compatibility adapter (a plain peft adapter directory), plus the Trainer's state.

    Under DeepSpeed (``TrainingArguments(deepspeed=...)``) the old model runs in its own inference
    engine, as TRL prepares teacher models (ZeRO-3: partitioned; ZeRO-1/2: stage 0, whole); under
    ZeRO-3 and FSDP2 ``save_model`` gathers the compatibility adapter on every rank and the main
    process writes it (muscle_fast/train/DISTRIBUTED.md).
    """

    # compute_loss divides by num_items_in_batch, the token count of the whole accumulated batch,
    # so training_step must not divide again by gradient_accumulation_steps (it would when this is
    # False, or None with a model that does not accept loss kwargs).
    loss_is_scaled_for_ga = True

    def __init__(self, model: CompatModel, args=None, compat_args: CompatArguments | None = None,
                 **kwargs):
        if compat_args is not None and compat_args.teacher_cache is not None:
            from .cache import cached_model

            model = cached_model(model, compat_args.teacher_cache)  # the student alone
        if not isinstance(model, CompatModel):
            raise TypeError(f"CompatTrainer trains a CompatModel, got {type(model).__name__} "
                            "(build one with build_compat_model)")
        if args is not None and getattr(args, "remove_unused_columns", False):
            args.remove_unused_columns = False  # CompatModel.forward takes **kwargs
        super().__init__(model=model, args=args, **kwargs)
        self.compat_args = compat_args or CompatArguments()
        self._stat_sums: dict = {}
        self._logits_wanted = True
        self._old_model_engine = None
        if self.is_deepspeed_enabled and getattr(model, "old_model", None) is not None:
            # the frozen old model gets its own inference engine, as TRL prepares a teacher:
            # partitioned under ZeRO-3, replicated (stage 0) under ZeRO-1/2; it leaves the
            # CompatModel's children, so the training engine holds only the new base and adapters
            old = model.old_model
            self._old_model_engine = _prepare_deepspeed_teacher(old, self.accelerator)
            model._modules.pop("old_model")
            object.__setattr__(model, "old_model", self._old_model_engine.module)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # evaluate() without compute_metrics keeps only the loss: the fused path then serves it
        self._logits_wanted = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self._logits_wanted = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if inputs.get("labels") is None:
            raise ValueError("CompatTrainer needs 'labels' in every batch")
        num_items = num_items_in_batch
        if num_items is None and model.training and self.args.gradient_accumulation_steps > 1:
            # only reached when the Trainer did not count tokens: fall back to a per-micro-batch
            # mean scaled for accumulation (exact only when micro-batches hold equal token counts)
            num_items = (inputs["labels"][:, 1:] != -100).sum() * self.current_gradient_accumulation_steps
        args = self.compat_args
        if not model.training:  # evaluation: no backward, keep the logits intact
            # logits only where the Trainer keeps them (prediction_step asks for outputs always)
            wants_logits = return_outputs and self._logits_wanted
            args = CompatArguments(**{**vars(args), "inplace_backward": False,
                                      "fused_linear": args.fused_linear and not wants_logits})
        loss, stats, out = compat_loss(model, inputs, args, num_items=num_items, return_outputs=True)
        out = {} if out is None else out  # the fused path computes no logits
        if model.training:
            self._accumulate(stats)
        if (self.args.average_tokens_across_devices and num_items_in_batch is not None
                and self.accelerator.num_processes > 1):
            # num_items_in_batch is the global count while DDP averages gradients over processes
            loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss

    def _accumulate(self, stats) -> None:
        n = stats.n_valid.detach()
        s = self._stat_sums
        s["n"] = s.get("n", 0) + n
        for f in _STAT_FIELDS:
            v = getattr(stats, f)
            if v is not None:
                s[f] = s.get(f, 0) + v.detach() * n  # token-weighted, no host sync here

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._stat_sums:
            s, self._stat_sums = self._stat_sums, {}
            names = list(s)
            sums = torch.stack([torch.as_tensor(s[k], dtype=torch.float64) for k in names])
            if self.accelerator.num_processes > 1:
                # every rank logs at the same step: token-weighted means over all ranks' tokens
                sums = self.accelerator.reduce(sums.to(self.accelerator.device), reduction="sum")
            totals = dict(zip(names, sums.tolist()))
            n = totals.pop("n")
            for f, v in totals.items():
                logs[f"compat/{f}"] = round(v / max(n, 1.0), 6)
        super().log(logs, *args, **kwargs)

    # ---- checkpoints: only the compatibility adapter ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            return super().save_model(output_dir, _internal_call)
        # sharded adapter weights (ZeRO-3 partitions, FSDP2 DTensors): every rank gathers the
        # compatibility adapter (only it: not the bases' gigabytes), the main process writes it
        state_dict = self._compat_state_dict()
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)

    def _compat_state_dict(self) -> dict:
        student = self.accelerator.unwrap_model(self.model).student
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        gathered = contextlib.nullcontext()
        if self.is_deepspeed_enabled:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([p for _, p in named])
        with gathered:
            return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
                    for n, p in named}

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, **kwargs)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        model.load_compat_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _prepare_deepspeed_teacher(model, accelerator):
    """A frozen teacher's DeepSpeed inference engine, as TRL prepares its reference and teacher
    models: the training config without optimizer and scheduler, ZeRO-3 kept (the teacher is
    partitioned like the student and gathered layer by layer in its forward), any other stage
    replaced by stage 0 (the teacher whole on every rank)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero.pop("offload_optimizer", None)
        # the model-dependent values transformers' deepspeed_init fills for the trained model
        cfg = getattr(model, "config", None)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        hidden = getattr(cfg, "hidden_size", None)
        if hidden is not None:
            for key, value in (("reduce_bucket_size", hidden * hidden),
                               ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                               ("stage3_param_persistence_threshold", 10 * hidden)):
                if zero.get(key, "auto") == "auto":
                    zero[key] = value
    else:
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
