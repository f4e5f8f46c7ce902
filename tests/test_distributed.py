"""Data parallel MUSCLE: 2 CPU processes over gloo give the gradient of one process on the
concatenated batch.

One launch of this file as a script on two processes (``python tests/test_distributed.py
CASE,CASE,... ...``, with the environment torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK, and a
``file://`` rendezvous in a tmp dir, no port) runs every case in turn, each on fresh models, and
each test checks its case's results: one interpreter start and one import of transformers per
rank instead of one per case (about 5 s of a 2-core machine each). Every rank builds the same global batch from one seed and keeps its own
rows; rows hold different numbers of valid tokens, so a per-rank mean would give a different
gradient than the global mean.

Why the world-size factor: each rank's loss is ``sum(rank's token losses) / N_global``
(``num_items`` = the all-reduced count); the sum of the ranks' losses is the global mean. DDP and
FSDP2 *average* the gradients over the W ranks (all-reduce SUM then divide by W), so each rank
multiplies its loss by W; the averaged gradient is then the gradient of the global mean.
transformers.Trainer does the same: with ``average_tokens_across_devices`` (default True) its
``_get_num_items_in_batch`` gathers and sums the per-rank counts of ``labels[..., 1:] != -100``
and ``compute_loss`` multiplies the loss by ``accelerator.num_processes`` (CompatTrainer
mirrors it).

Tolerance: fp32, atol 1e-6 rtol 1e-5: the two ranks' partial sums are reduced in a different
order than the single-process sum, which is a rounding difference only.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD = 2
B, T, H, V = 6, 7, 16, 40
ATOL, RTOL = 1e-6, 1e-5
TIMEOUT_S = 120


# ---------------------------------------------------------------- shared data


def _lm_batch(seed: int = 0):
    """Hidden states, labels (unequal valid counts per row), old and new teacher logits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    for i in range(B):
        labels[i, : 1 + 2 * i % T] = -100  # rank 0 gets rows 0-2, rank 1 rows 3-5: unequal counts
    old = torch.randn(B, T, V, generator=g) * 2
    new = torch.randn(B, T, V, generator=g) * 2
    return x, labels, old, new


def _head(seed: int = 1):
    torch.manual_seed(seed)
    return torch.nn.Linear(H, V)


def _shard(t, rank):
    rows = t.shape[0] // WORLD
    return t[rank * rows:(rank + 1) * rows]


IMPLS = ("torch", "native")


def _lm_loss(head, x, labels, old, new, impl, num_items=None):
    from muscle_fast import fused_compat_loss

    return fused_compat_loss(head(x), labels, old, new, mask="muscle", temperature=2.0,
                             ce_weight=0.5, num_items=num_items, impl=impl)


# ---- the compatibility model of test_train.py, smaller

VOCAB, SEQ = 64, 10


def _llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _save_models(d: Path):
    from peft import LoraConfig, get_peft_model

    for name, seed in (("old", 1), ("new", 2)):
        _llama(seed).save_pretrained(d / f"{name}_base")
        torch.manual_seed(seed + 10)
        m = get_peft_model(_llama(seed), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
            init_lora_weights=False))
        m.save_pretrained(str(d / f"{name}_adapter"))


def _build(d: Path):
    from muscle_fast.train import build_compat_model

    return build_compat_model(str(d / "new_base"), str(d / "new_adapter"), str(d / "old_base"),
                              str(d / "old_adapter"))


def _compat_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
    attn = torch.ones_like(ids)
    for i, length in enumerate((10, 4, 9, 6)):  # right padding, unequal valid counts per rank
        attn[i, length:] = 0
    labels = torch.where(attn.bool(), ids, torch.full_like(ids, -100))
    labels[:, :2] = -100
    return {"input_ids": ids * attn, "attention_mask": attn, "labels": labels}


def _compat_grads(model):
    inner = getattr(model, "module", model)
    grads = {n: p.grad.detach() for n, p in inner.named_parameters() if p.requires_grad}
    # FSDP2 holds sharded DTensor gradients: gather each whole
    return {n: g.full_tensor() if hasattr(g, "full_tensor") else g.clone() for n, g in grads.items()}


# ---------------------------------------------------------------- the ranks


def _worker(case: str, out: Path, models: Path | None):
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["MUSCLE_TEST_INIT"], rank=rank,
                            world_size=world)
    try:
        for name in case.split(","):  # after a failure the ranks' collectives may not match: stop
            (out / name).mkdir(exist_ok=True)
            torch.save(_run_case(name, out / name, models, rank, world),
                       out / name / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_case(case: str, out: Path, models: Path | None, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from muscle_fast.distributed import global_num_items

    result = {}
    if case == "ddp_loss":
        x, labels, old, new = (_shard(t, rank) for t in _lm_batch())
        n = global_num_items(labels)
        for impl in IMPLS:
            model = DDP(_head())
            loss = _lm_loss(model, x, labels, old, new, impl, num_items=n)
            (loss * world).backward()  # DDP averages over ranks: see the module docstring
            result[impl] = {"loss": loss.detach(), "n": n,
                            **{k: p.grad.clone() for k, p in model.module.named_parameters()}}
    elif case == "fsdp2_loss":
        from torch.distributed.fsdp import fully_shard

        x, labels, old, new = (_shard(t, rank) for t in _lm_batch())
        n = global_num_items(labels)
        for impl in IMPLS:
            model = fully_shard(_head())
            loss = _lm_loss(model, x, labels, old, new, impl, num_items=n)
            (loss * world).backward()  # FSDP2's reduce-scatter averages over ranks too
            result[impl] = {"loss": loss.detach(),
                            **{k: p.grad.full_tensor() for k, p in model.named_parameters()}}
    elif case == "ddp_compat_step":
        from muscle_fast.train import compat_training_step

        model = _build(models)
        # DDP wraps the student (the only module with trainable parameters); compat_loss calls
        # the CompatModel, whose forward and teacher pass go through the wrapped student
        model.student = DDP(model.student)
        batch = {k: _shard(v, rank) for k, v in _compat_batch().items()}
        n = global_num_items(batch["labels"][:, 1:])
        # compat_training_step backpropagates its own loss: scale the divisor instead of the
        # loss (num_items / W makes loss * W, which DDP's average brings back)
        stats = compat_training_step(model, batch, num_items=n / world)
        result = {"loss": stats["loss"] / world,
                  **_compat_grads(model.student)}
    elif case == "fsdp2_compat_step":
        from torch.distributed.fsdp import fully_shard

        from muscle_fast.train import compat_training_step

        model = _build(models)
        # FSDP2 on the student: each decoder layer, then the student itself (the root); the
        # teacher pass and the student pass both go through the sharded modules' hooks
        for layer in model.student.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model.student)
        batch = {k: _shard(v, rank) for k, v in _compat_batch().items()}
        n = global_num_items(batch["labels"][:, 1:])
        stats = compat_training_step(model, batch, num_items=n / world)
        result = {"loss": stats["loss"] / world, **_compat_grads(model.student)}
    elif case == "fsdp2_whole_compat_model":
        from torch.distributed.fsdp import fully_shard

        from muscle_fast.train import compat_training_step

        # what accelerate's FSDP2 does: shard every decoder layer (student and old model),
        # then the CompatModel as the root, which owns the embeddings, norms and lm_heads
        model = _build(models)
        for m in list(model.modules()):
            if type(m).__name__ == "LlamaDecoderLayer":
                fully_shard(m)
        fully_shard(model)
        batch = {k: _shard(v, rank) for k, v in _compat_batch().items()}
        n = global_num_items(batch["labels"][:, 1:])
        stats = compat_training_step(model, batch, num_items=n / world)
        result = {"loss": stats["loss"] / world, **_compat_grads(model.student)}
    elif case in ("fsdp2_sharded_heads", "fsdp2_sharded_heads_materialised"):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        from muscle_fast.train import CompatArguments, compat_training_step

        # every decoder layer and both output heads sharded on their own, the CompatModel
        # as root: a head's weight is whole only inside that head's forward, where the fused
        # loss runs. Two micro-batches of one row per rank: 2 ranks x 2 = the batch of 4.
        model = _build(models)
        for m in list(model.modules()):
            if type(m).__name__ == "LlamaDecoderLayer":
                fully_shard(m)
        heads = [model.student.get_output_embeddings(), model.old_model.get_output_embeddings()]
        for head in heads:
            fully_shard(head)
        fully_shard(model)
        assert all(isinstance(h.weight, DTensor) for h in heads)  # outside forward: a shard
        args = CompatArguments(fused_linear=case == "fsdp2_sharded_heads", chunk_size=3)
        batch = {k: _shard(v, rank) for k, v in _compat_batch().items()}
        n = global_num_items(batch["labels"][:, 1:])
        losses = [compat_training_step(model, {k: v[i:i + 1] for k, v in batch.items()},
                                       args=args, num_items=n / world)["loss"]
                  for i in range(2)]
        # the fused case ran fused (no fallback); the materialised one never asked
        assert model._fused_reason == ("" if args.fused_linear else None)
        result = {"loss": sum(losses) / world, **_compat_grads(model.student)}
    elif case == "ddp_accumulate":
        from muscle_fast.train import compat_training_step

        model = DDP(_build(models))
        batch = {k: _shard(v, rank) for k, v in _compat_batch().items()}
        n = global_num_items(batch["labels"][:, 1:])  # over both micro-batches of this rank
        losses = []
        for i in range(2):
            micro = {k: v[i:i + 1] for k, v in batch.items()}
            ctx = model.no_sync() if i == 0 else contextlib.nullcontext()
            with ctx:  # all-reduce once, after the last micro-batch
                losses.append(compat_training_step(model, micro, num_items=n / world)["loss"])
        result = {"loss": sum(losses) / world, **_compat_grads(model.module.student)}
    elif case == "ddp_whole_compat_model":
        from muscle_fast.train import compat_training_step

        model = DDP(_build(models))  # the wrapper transformers.Trainer / accelerate apply
        batch = {k: _shard(v, rank) for k, v in _compat_batch().items()}
        n = global_num_items(batch["labels"][:, 1:])
        stats = compat_training_step(model, batch, num_items=n / world)
        result = {"loss": stats["loss"] / world, **_compat_grads(model.module.student)}
    elif case == "trainer":
        from transformers import TrainerCallback, TrainingArguments

        from muscle_fast.train import CompatTrainer

        grads, logged = {}, {}

        class Grab(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                grads.update(_compat_grads(getattr(model, "module", model).student))

            def on_log(self, args, state, control, logs=None, **kw):
                logged.update({k: v for k, v in (logs or {}).items()
                               if k.startswith("compat/")})

        b = _compat_batch()
        rows = [{k: v[i] for k, v in b.items()} for i in range(len(b["labels"]))]
        args = TrainingArguments(
            output_dir=str(out / "trainer"), per_device_train_batch_size=len(rows) // world,
            max_steps=1, learning_rate=1e-3, max_grad_norm=0, save_strategy="no",
            report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
            logging_steps=1)
        trainer = CompatTrainer(model=_build(models), args=args, train_dataset=rows,
                                callbacks=[Grab()])
        assert trainer.accelerator.num_processes == world
        trainer.train()  # each rank takes 2 of the 4 rows: together the whole batch
        result = {**grads, "logged": logged}
    else:
        raise ValueError(case)
    return result


def _launch(cases: list, tmp_path: Path, models: Path | None = None):
    """Run the cases in turn on WORLD processes with torchrun's environment. Returns
    ({case: each rank's result} of the cases every rank finished, the failed ranks' output)."""
    init = tmp_path / "rendezvous"
    env_base = {**os.environ, "WORLD_SIZE": str(WORLD), "MUSCLE_TEST_INIT": init.as_uri(),
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                               os.environ.get("PYTHONPATH", "")])}
    procs = []
    for rank in range(WORLD):
        env = {**env_base, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(WORLD)}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, ",".join(cases), str(tmp_path), str(models or "")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=TIMEOUT_S * len(cases))[0])
            except subprocess.TimeoutExpired:
                p.kill()
                logs.append(p.communicate()[0] + f"\n(killed after {TIMEOUT_S * len(cases)} s)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failure = "\n".join(f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"
                        for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0)
    results = {}
    for case in cases:
        files = [tmp_path / case / f"rank{r}.pt" for r in range(WORLD)]
        if all(f.exists() for f in files):
            results[case] = [torch.load(f) for f in files]
    return results, failure


DATA_PARALLEL_CASES = [pytest.param("ddp_loss", id="ddp"), pytest.param("fsdp2_loss", id="fsdp2")]
COMPAT_CASES = [
    pytest.param("ddp_compat_step", id="ddp-student"),
    pytest.param("ddp_whole_compat_model", id="ddp-compat-model"),
    pytest.param("ddp_accumulate", id="ddp-accumulate-2x2"),
    pytest.param("fsdp2_sharded_heads", id="fsdp2-sharded-heads-fused-2x2"),
    pytest.param("fsdp2_sharded_heads_materialised", id="fsdp2-sharded-heads-materialised-2x2"),
    pytest.param("fsdp2_compat_step", id="fsdp2-student"),
    pytest.param("fsdp2_whole_compat_model", id="fsdp2-compat-model"),
    pytest.param("trainer", id="compat-trainer")]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every case of this file, run by one launch: (results, failed ranks' output, models)."""
    d = tmp_path_factory.mktemp("ranks")
    cases, models = [c.values[0] for c in DATA_PARALLEL_CASES], None
    if all(importlib.util.find_spec(m) for m in ("transformers", "peft")):
        models = d / "models"
        _save_models(models)
        cases += [c.values[0] for c in COMPAT_CASES]
    results, failure = _launch(cases, d, models)
    return results, failure, models


def _ranks(launched, case):
    results, failure, _ = launched
    assert case in results, f"{case} did not finish on every rank:\n{failure}"
    return results[case]


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", DATA_PARALLEL_CASES)
def test_data_parallel_fused_loss_equals_one_process(case, launched):
    ranks = _ranks(launched, case)
    x, labels, old, new = _lm_batch()
    for impl in IMPLS:
        head = _head()
        loss = _lm_loss(head, x, labels, old, new, impl)  # the mean over the concatenated batch
        loss.backward()
        if "n" in ranks[0][impl]:
            assert all(int(r[impl]["n"]) == int((labels != -100).sum()) for r in ranks)
        # the ranks' losses add up to the global mean
        _close(sum(r[impl]["loss"] for r in ranks), loss.detach(), f"{impl} loss")
        for k, p in head.named_parameters():
            for rank, r in enumerate(ranks):
                _close(r[impl][k], p.grad, f"{impl} grad {k} on rank {rank}")
    # the shards' valid counts differ, so a per-rank mean would not have passed
    assert int((_shard(labels, 0) != -100).sum()) != int((_shard(labels, 1) != -100).sum())


@pytest.mark.parametrize("case", COMPAT_CASES)
def test_ddp_compat_training_equals_one_process(case, launched):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from muscle_fast.train import compat_training_step

    ranks, models = _ranks(launched, case), launched[2]
    model = _build(models)
    stats = compat_training_step(model, _compat_batch())
    ref = _compat_grads(model.student)
    assert ref and all(".default." in k for k in ref)
    if case != "trainer":
        _close(torch.tensor(sum(r["loss"] for r in ranks)), torch.tensor(stats["loss"]), "loss")
    for rank, r in enumerate(ranks):
        if case == "trainer":
            # compat/* stats are token-weighted over both ranks' tokens, the same on every rank
            logged = r.pop("logged")
            want = {f"compat/{k}": v for k, v in stats.items() if k not in ("loss", "n_valid")}
            assert set(logged) == set(want), (sorted(logged), sorted(want))
            for k, v in want.items():
                assert abs(logged[k] - v) <= 2e-6, f"{k} on rank {rank}: {logged[k]} != {v}"
        assert set(r) - {"loss"} == set(ref)
        for k, g in ref.items():
            _close(r[k], g, f"grad {k} on rank {rank}")


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) if sys.argv[3] else None)
