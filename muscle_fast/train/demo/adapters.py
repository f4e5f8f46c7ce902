"""Step 3 of the demo: a LoRA task adapter on each base, trained on the task's train split and
kept at its best validation loss (the paper's "best epoch by validation loss"), and the task
models' answers on the held-out test items."""
from __future__ import annotations

import numpy as np
import torch

from .bases import progress
from .setting import DIGITS, DemoConfig, collate, encode, task_prompt

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@torch.no_grad()
def val_loss(model, val_batch: dict) -> float:
    was = model.training
    model.eval()
    loss = float(model(**val_batch).loss)
    model.train(was)
    return loss


def train_task_adapter(cfg: DemoConfig, base, train, val, seed: int, quiet: bool, desc: str):
    """A LoRA task adapter trained with cross-entropy on the task rows (``task_rows``), AdamW
    with the lr decaying linearly from ``task_lr`` to 0 over ``task_steps`` steps (the
    transformers Trainer's default schedule), evaluated on the validation split every
    ``task_eval_every`` steps and returned at its best validation loss. Selection uses the
    validation split only.

    Returns ``(model, info)``, info = the seed, best step, best validation loss, the curve."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r,
                                            lora_dropout=0.0, target_modules=LORA_TARGETS))
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=cfg.task_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / cfg.task_steps)
    g = torch.Generator().manual_seed(seed)
    val_batch = collate(val)
    best = (val_loss(model, val_batch), 0, {n: p.detach().clone() for n, p in params.items()})
    curve = [(0, best[0])]
    bar = progress(cfg.task_steps, desc, quiet)
    for step in range(1, cfg.task_steps + 1):
        idx = torch.randint(len(train), (cfg.task_batch,), generator=g).tolist()
        loss = model(**collate([train[i] for i in idx])).loss
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        bar.update(), bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.task_eval_every == 0 or step == cfg.task_steps:
            v = val_loss(model, val_batch)
            curve.append((step, v))
            if v < best[0]:
                best = (v, step, {n: p.detach().clone() for n, p in params.items()})
    bar.close()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best[2][n])
    info = {"seed": seed, "best_step": best[1], "best_val_loss": best[0], "val_curve": curve}
    return model.eval(), info


@torch.no_grad()
def predict(model, tok, items, answer_len: int, batch: int = 1024) -> np.ndarray:
    """The task model's answer, decoded greedily as generation would: at each answer position
    the argmax over the ten digit tokens, fed back for the next. Returns ``[len(items),
    answer_len]`` digits."""
    digit_ids = torch.tensor(tok.convert_tokens_to_ids(list(DIGITS)))
    was = model.training
    model.eval()
    preds = []
    for s in range(0, len(items), batch):
        ids = encode(tok, [task_prompt(it) for it in items[s:s + batch]])
        out = []
        for _ in range(answer_len):
            d = model(input_ids=ids).logits[:, -1, digit_ids].argmax(-1)
            out.append(d)
            ids = torch.cat([ids, digit_ids[d][:, None]], 1)
        preds.append(torch.stack(out, 1))
    model.train(was)
    return torch.cat(preds).numpy()
