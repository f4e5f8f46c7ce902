"""``CompatTrainer``: transformers.Trainer training the compatibility adapter with MUSCLE's loss."""
from __future__ import annotations

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
    """

    # compute_loss divides by num_items_in_batch, the token count of the whole accumulated batch,
    # so training_step must not divide again by gradient_accumulation_steps (it would when this is
    # False, or None with a model that does not accept loss kwargs).
    loss_is_scaled_for_ga = True

    def __init__(self, model: CompatModel, args=None, compat_args: CompatArguments | None = None,
                 **kwargs):
        if not isinstance(model, CompatModel):
            raise TypeError(f"CompatTrainer trains a CompatModel, got {type(model).__name__} "
                            "(build one with build_compat_model)")
        if args is not None and getattr(args, "remove_unused_columns", False):
            args.remove_unused_columns = False  # CompatModel.forward takes **kwargs
        super().__init__(model=model, args=args, **kwargs)
        self.compat_args = compat_args or CompatArguments()
        self._stat_sums: dict = {}
        self._logits_wanted = True

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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        model.load_compat_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
