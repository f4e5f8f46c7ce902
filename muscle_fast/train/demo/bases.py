"""Step 2 of the demo: the two pre-trained bases. The update is a new pre-training run, not v1
continued: v2 has its own initialisation, its own corpus mix and more compute. Bases are cached
in the output directory (``_Job.base_path``), keyed by everything that decides them."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import torch

from .setting import VOCAB, BaseSpec, DemoConfig, corpus_floor, corpus_items, encode, \
    encode_pretrain, pretrain_text


def tiny_llama(spec: BaseSpec, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads, max_position_embeddings=16, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True)


def _pretrain_run(spec: BaseSpec, cfg: DemoConfig, tok, seed: int, held_ids, floor: float,
                  quiet: bool, desc: str):
    """One pre-training run from the init and data order of ``seed``; see ``pretrain_base``."""
    model = tiny_llama(spec, len(tok), seed)
    model.train()
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pre_lr, weight_decay=0.01)
    curve, best = [], None
    bar = progress(spec.steps, desc, quiet)
    step = 0
    while step < spec.steps:
        ids = encode_pretrain(tok, corpus_items(rng, spec, cfg.pre_batch))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(), bar.set_postfix(loss=f"{loss.item():.3f}")
        if spec.converge_tol is not None and (step % spec.check_every == 0 or step == spec.steps):
            with torch.no_grad():
                model.eval()
                held_loss = float(model(input_ids=held_ids, labels=held_ids).loss)
                model.train()
            curve.append((step, held_loss))
            if best is None or held_loss < best[0]:
                best = (held_loss, step, {k: v.detach().clone()
                                          for k, v in model.state_dict().items()})
            if held_loss - floor <= spec.converge_tol:
                break
    bar.close()
    info = {"seed": seed, "steps_run": step, "kept_step": step, "held_out_curve": curve,
            "floor": floor, "converged": None}
    if best is not None:
        model.load_state_dict(best[2])
        info.update(kept_step=best[1], held_out_loss=best[0],
                    converged=best[0] - floor <= spec.converge_tol)
    return model, info


def pretrain_base(spec: BaseSpec, cfg: DemoConfig, tok, seed: int, quiet: bool):
    """Causal-LM pre-training on the synthetic corpus, ops drawn with the spec's mix.

    With ``spec.converge_tol``, the run is checked every ``spec.check_every`` steps on a held-out
    sample of its own corpus (1024 sequences from a separate generator; pre-training data only)
    and stops once the held-out loss is within ``converge_tol`` of the sample's entropy floor, or
    after ``spec.steps``; the checkpoint with the lowest held-out loss is kept. A run that has
    not converged by ``spec.steps`` is a failed run (a plateau it did not leave): it is started
    again from a new init and data order (``seed + 1000 k``), at most ``spec.max_runs`` runs in
    all, and the run with the lowest held-out loss is returned. Only pre-training data decides.

    Returns ``(model, info)``; info = the kept run's steps, kept step, held-out curve and floor,
    plus ``runs`` (every run's seed, steps and held-out loss)."""
    held = corpus_items(np.random.default_rng([seed, 7]), spec, 1024)
    held_ids = encode(tok, [pretrain_text(it) for it in held])
    floor = corpus_floor(spec, held)
    kept, runs = None, []
    for k in range(spec.max_runs if spec.converge_tol is not None else 1):
        desc = f"pre-train base (run {k + 1}, up to {spec.steps} steps)"
        model, info = _pretrain_run(spec, cfg, tok, seed + 1000 * k, held_ids, floor, quiet, desc)
        runs.append({key: info.get(key) for key in ("seed", "steps_run", "kept_step",
                                                     "held_out_loss", "converged")})
        if kept is None or info["held_out_loss"] < kept[1]["held_out_loss"]:
            kept = (model, info)
        if info["converged"] is not False:
            break
    model, info = kept
    info["runs"] = runs
    return model.eval(), info


def base_key(spec: BaseSpec, cfg: DemoConfig, seed: int) -> str:
    """The cache key of a base: its spec, the pre-training batch and lr, its seed, the vocab."""
    blob = json.dumps({"spec": asdict(spec), "pre_batch": cfg.pre_batch, "pre_lr": cfg.pre_lr,
                       "seed": seed, "vocab": VOCAB})
    return hashlib.sha1(blob.encode()).hexdigest()[:10]
