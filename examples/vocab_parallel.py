"""The MUSCLE loss with a vocabulary-parallel (column-sharded) lm_head, checked against one device.

    torchrun --standalone --nproc-per-node 2 examples/vocab_parallel.py            # CPU: gloo
    torchrun --standalone --nproc-per-node 8 examples/vocab_parallel.py --vocab 128256 --tokens 8192 --hidden 4096 --dtype bf16

Every rank holds the rows [vocab_start, vocab_start + V / world) of the student's and both
teachers' lm_heads, and the full hidden states. ``fused_linear_compat_loss(...,
process_group=...)`` returns the loss of the whole vocabulary on every rank; the lm_head gets its
slice's gradient, the hidden states the full one. No rank ever holds [tokens, vocab] logits.
With ``--check`` rank 0 recomputes everything on the whole vocabulary and compares.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Run fused_linear_compat_loss on a vocabulary split over the ranks of "
                    "torchrun and compare with one process on the whole vocabulary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank's batch (replicated)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--vocab", type=int, default=1000, help="vocabulary size (split over ranks)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--mask", default="muscle")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the single-device comparison on rank 0")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from muscle_fast import fused_linear_compat_loss

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    # the same full tensors on every rank (one seed), then each rank keeps its vocabulary rows
    g = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = torch.randn(n, h, generator=g)
    heads = [torch.randn(v, h, generator=g) / h ** 0.5 for _ in range(3)]  # student, old, new
    old_hidden, new_hidden = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    sizes = [v // world + (r < v % world) for r in range(world)]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])

    def put(x):
        return x.to(device=device, dtype=dtype)

    x = put(hidden).requires_grad_()
    w = put(heads[0][rows]).requires_grad_()
    kw = dict(old_hidden=put(old_hidden), old_weight=put(heads[1][rows]),
              new_hidden=put(new_hidden), new_weight=put(heads[2][rows]), mask=args.mask,
              ce_weight=0.1, return_stats=True)
    loss, stats = fused_linear_compat_loss(x, w, labels.to(device), process_group=dist.group.WORLD,
                                           vocab_start=start, **kw)
    loss.backward()
    # gather the weight gradient's slices (padded: gloo gathers equal sizes only)
    pad = max(sizes)
    mine = torch.zeros(pad, h, dtype=dtype, device=device)
    mine[:sizes[rank]] = w.grad
    parts = [torch.empty_like(mine) for _ in sizes]
    dist.all_gather(parts, mine)
    grads = [part[:s] for part, s in zip(parts, sizes)]
    if rank == 0:
        print(f"{world} ranks, vocabulary slices {sizes}: loss {loss.item():.6f}, "
              f"frac_to_old {float(stats.frac_to_old):.4f}, acc_student "
              f"{float(stats.acc_student):.4f}")
        if args.check:
            x1 = put(hidden).requires_grad_()
            w1 = put(heads[0]).requires_grad_()
            kw1 = dict(kw, old_weight=put(heads[1]), new_weight=put(heads[2]))
            loss1, _ = fused_linear_compat_loss(x1, w1, labels.to(device), **kw1)
            loss1.backward()
            errs = {"loss": (loss - loss1).abs().item(),
                    "grad hidden": (x.grad.float() - x1.grad.float()).abs().max().item(),
                    "grad weight": (torch.cat(grads).float() - w1.grad.float()).abs().max().item()}
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            print("max |vocab parallel - one device|: " +
                  ", ".join(f"{k} {e:.2e}" for k, e in errs.items()) + f" (tolerance {tol:g})")
            if max(errs.values()) > tol:
                print("MISMATCH")
                dist.destroy_process_group()
                return 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
