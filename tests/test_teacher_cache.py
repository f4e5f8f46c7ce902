"""Teacher cache (issue 24, items 4-5): built once by build_teacher_cache / `muscle-fast
cache-teachers`, resumable, and trained from with only the new base + compatibility adapter; with
kind="hidden" a step equals the live teachers' step under the pass rule."""
import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

from conftest import assert_pass_rule
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

from muscle_fast.train import (
    CachedCompatModel,
    CompatArguments,
    CompatTrainer,
    TeacherCache,
    TeacherCacheError,
    build_cached_compat_model,
    build_compat_model,
    build_teacher_cache,
    compat_loss,
    compat_training_step,
)
from muscle_fast.train import cache as C

VOCAB, SEQ, HID = 96, 12, 32
STAT_FIELDS = ("n_valid", "frac_to_old", "acc_student", "acc_old", "acc_new", "kl_old", "kl_new",
               "ce")

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(seed, vocab=VOCAB):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HID, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _adapter(base, seed, path):
    torch.manual_seed(seed + 10)
    m = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        init_lora_weights=False))
    m.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(new_base, new_adapter, old_base, old_adapter): two bases, a random task adapter each."""
    d = tmp_path_factory.mktemp("parts")
    old, new = _llama(1), _llama(2)
    return new, _adapter(new, 2, d / "new"), old, _adapter(old, 1, d / "old")


def _teachers(parts):
    new_base, new_adapter, old_base, old_adapter = parts
    old = PeftModel.from_pretrained(copy.deepcopy(old_base), old_adapter).eval()
    new = PeftModel.from_pretrained(copy.deepcopy(new_base), new_adapter).eval()
    return old, new


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    attn = torch.ones_like(ids)
    for i in range(n):
        attn[i, 5 + (3 * i) % (SEQ - 4):] = 0  # right padding, unequal lengths
    labels = torch.where(attn.bool(), ids, torch.full_like(ids, -100))
    labels[:, :3] = -100
    return {"input_ids": ids * attn, "attention_mask": attn, "labels": labels}


def _rows(batch):
    return [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]


def _perturb(model):
    torch.manual_seed(5)  # move the student off the new teacher: both KL terms non-trivial
    with torch.no_grad():
        for p in model.compat_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _live(parts):
    new_base, new_adapter, old_base, old_adapter = parts
    return _perturb(build_compat_model(copy.deepcopy(new_base), new_adapter,
                                       copy.deepcopy(old_base), old_adapter))


@pytest.fixture(scope="module")
def hidden_cache(parts, tmp_path_factory):
    d = tmp_path_factory.mktemp("hidden")
    old, new = _teachers(parts)
    rows = _rows(_batch(8, seed=3)) + _rows(_batch(4))
    build_teacher_cache(d, rows, old_model=old, new_model=new, rows_per_shard=5, batch_size=3,
                        progress=False, log=lambda *_: None)
    return str(d)


def _run(model, batch, **kw):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, stats = compat_loss(model, batch, CompatArguments(**kw))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), stats, grads


# ---------------------------------------------------------------- hidden: the live step, exactly


@pytest.mark.parametrize("kw", [
    pytest.param({}, id="paper-defaults"),
    pytest.param({"ce_weight": 0.3, "temperature": 1.5, "chunk_size": 7}, id="ce-T1.5-chunk7"),
    pytest.param({"mask": "token_likelihood", "kl_weight": 0.7}, id="token_likelihood"),
    pytest.param({"mask": "old_correct", "fused_linear": False}, id="old_correct-materialised"),
])
def test_hidden_step_equals_live_step(parts, hidden_cache, kw):
    """loss, stats and adapter gradients from the cache pass the rule against the live teachers
    (float64 materialised reference, float32 torch peer)."""
    live = _live(parts)
    batch = _batch()
    peer = {**kw, "fused_linear": False, "impl": "torch"}
    ref = _run(copy.deepcopy(live).double(), batch, **peer)
    same = _run(live, batch, **peer)
    cached = _run(live.student, batch, teacher_cache=hidden_cache, **kw)  # the student alone
    cached = (*cached[:2], {f"student.{n}": g for n, g in cached[2].items()})
    assert_pass_rule(cached[0], same[0], ref[0], torch.float32, "loss")
    for f in STAT_FIELDS:
        assert_pass_rule(getattr(cached[1], f), getattr(same[1], f), getattr(ref[1], f),
                         torch.float32, f"stats.{f}")
    assert set(cached[2]) == set(ref[2]) and cached[2]
    assert any(g.abs().sum() > 0 for g in cached[2].values())
    for n in ref[2]:
        assert_pass_rule(cached[2][n], same[2][n], ref[2][n], torch.float32, f"grad {n}")


def test_cached_model_holds_no_old_body(parts, hidden_cache):
    new_base, new_adapter, old_base, _ = parts
    model = build_cached_compat_model(copy.deepcopy(new_base), new_adapter, hidden_cache)
    assert isinstance(model, CachedCompatModel)
    old_body = {p.data_ptr() for n, p in old_base.named_parameters() if "lm_head" not in n}
    mine = list(model.parameters())
    assert not any(p.data_ptr() in old_body for p in mine)
    n_student = sum(p.numel() for p in model.student.parameters())
    n_old_head = old_base.lm_head.weight.numel()
    assert sum(p.numel() for p in mine) == n_student + n_old_head  # + the old head, nothing else
    torch.testing.assert_close(model.old_head.weight, old_base.lm_head.weight, rtol=0, atol=0)


def _trainer(model, tmp_path, compat_args, rows):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, max_steps=2,
                             logging_steps=1, save_strategy="no", report_to=[], seed=0,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    return CompatTrainer(model, args, train_dataset=rows, compat_args=compat_args)


def test_trainer_from_hidden_cache_equals_live(parts, hidden_cache, tmp_path):
    """Two shuffled CompatTrainer steps of 2 x 2 accumulated rows: the same logs and adapter
    updates as with the live teachers; the cached run loads only the new base + adapter."""
    rows = _rows(_batch(8, seed=3))
    runs = []
    for name in ("live", "cache"):
        if name == "live":
            model = _live(parts)
            ca = CompatArguments(ce_weight=0.2, chunk_size=8)
        else:
            new_base, new_adapter, _, _ = parts
            model = _perturb(build_cached_compat_model(copy.deepcopy(new_base), new_adapter,
                                                       hidden_cache))
            ca = CompatArguments(ce_weight=0.2, chunk_size=8, teacher_cache=hidden_cache)
        w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer = _trainer(model, tmp_path / name, ca, rows)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        eval_loss = trainer.evaluate(eval_dataset=rows[:4])["eval_loss"]
        dw = {n: p.detach() - w0[n] for n, p in model.named_parameters() if p.requires_grad}
        runs.append((logs + [{"loss": eval_loss}], dw))
    (ll, ldw), (cl, cdw) = runs
    assert len(ll) == len(cl) == 3
    for a, b in zip(cl, ll):
        keys = [k for k in b if k == "loss" or k.startswith("compat/")]
        assert keys
        for k in keys:
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6), (k, a[k], b[k])
    assert set(cdw) == set(ldw) and any(d.abs().sum() > 0 for d in cdw.values())
    for n in ldw:
        torch.testing.assert_close(cdw[n], ldw[n], rtol=1e-4, atol=1e-6, msg=n)


def test_rows_found_in_any_order_and_padding_width(parts, hidden_cache, monkeypatch):
    """A row is its tokens: reordered rows, another padded width, no attention mask (one shard
    file open at a time: rows of the three shards are read in turn)."""
    monkeypatch.setattr(C, "_OPEN_SHARDS", 1)
    live = _live(parts)
    b = _batch()
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = {k: v[perm] for k, v in b.items()}
    wide = {k: torch.cat([v, torch.full((4, 3), -100 if k == "labels" else 0)], 1)
            for k, v in b.items()}
    a = _run(live.student, b, teacher_cache=hidden_cache)
    s = _run(live.student, shuffled, teacher_cache=hidden_cache)
    w = _run(live.student, wide, teacher_cache=hidden_cache)
    for x in (s, w):
        torch.testing.assert_close(x[0], a[0], rtol=1e-6, atol=1e-7)
    cache = TeacherCache(hidden_cache)
    n = int(b["attention_mask"][0].sum())  # without an attention mask the whole row is the row:
    assert cache.locate(b["input_ids"][:1, :n], None, b["labels"][:1, :n])[0][2] == n
    with pytest.raises(TeacherCacheError, match="not in the teacher cache"):  # + one pad token
        cache.locate(b["input_ids"][:1, :n + 1], None, None)


def test_plain_step_from_cache(parts, hidden_cache):
    live = _live(parts)
    out = compat_training_step(live.student, _batch(), None,
                               CompatArguments(teacher_cache=hidden_cache))
    assert math.isfinite(out["loss"]) and out["loss"] > 0 and 0 <= out["frac_to_old"] <= 1


# ---------------------------------------------------------------- the builder: files, resume


def _shard_tensors(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                out.update({f"{name}/{k}": f.get_tensor(k).clone() for k in f.keys()})  # noqa: SIM118
    return out


def test_hidden_cache_layout(parts, hidden_cache):
    old, new = _teachers(parts)
    cache = TeacherCache(hidden_cache, verify=True)
    m = cache.manifest
    assert m["kind"] == "hidden" and m["vocab_size"] == VOCAB and m["n_rows"] == 12
    assert [s["index"] for s in m["shards"]] == [0, 1, 2] and m["complete"]
    assert m["models"]["old"]["hidden_size"] == HID and m["models"]["old"]["dtype"] == "float32"
    assert m["models"]["old"]["base"] != m["models"]["new"]["base"]
    b = _batch()
    old_h, new_h = cache.hidden(b["input_ids"], b["attention_mask"])
    for model, h in ((old, old_h), (new, new_h)):  # the head's input, bit for bit (one row)
        for i in range(4):
            n = int(b["attention_mask"][i].sum())
            want = C._capture_hidden(model, model.get_output_embeddings(),
                                     b["input_ids"][i:i + 1, :n], b["attention_mask"][i:i + 1, :n])
            torch.testing.assert_close(h[i, :n], want[0], rtol=1e-6, atol=1e-6)
            assert not h[i, n:].any()
    size = sum(s["bytes"] for s in m["shards"])
    per_token = C.cache_size_estimate("hidden", 1, hidden_sizes=(HID, HID), elem_sizes=(4, 4))
    assert per_token == 2 * HID * 4
    assert m["n_tokens"] * per_token <= size <= m["n_tokens"] * per_token + 3 * 4096


def test_hidden_is_stored_in_the_models_dtype_bit_for_bit(parts, tmp_path):
    """A bf16 teacher's head input is stored as bf16, the very values its forward makes."""
    old, new = (m.to(torch.bfloat16) for m in _teachers(parts))
    b = _batch()
    rows = _rows(b)
    build_teacher_cache(tmp_path, rows, old_model=old, new_model=new, batch_size=1,
                        progress=False, log=lambda *_: None)
    cache = TeacherCache(tmp_path)
    assert cache.manifest["models"]["old"]["dtype"] == "bfloat16"
    old_h, new_h = cache.hidden(b["input_ids"], b["attention_mask"])
    assert old_h.dtype == new_h.dtype == torch.bfloat16
    for model, h in ((old, old_h), (new, new_h)):
        for i in range(4):
            n = int(b["attention_mask"][i].sum())
            want = C._capture_hidden(model, model.get_output_embeddings(),
                                     b["input_ids"][i:i + 1, :n], b["attention_mask"][i:i + 1, :n])
            assert torch.equal(h[i, :n], want[0])


def _build(directory, parts, rows, **kw):
    old, new = _teachers(parts)
    return build_teacher_cache(directory, rows, old_model=old, new_model=new, rows_per_shard=3,
                               batch_size=2, progress=False, log=lambda *_: None, **kw)


@pytest.mark.parametrize("when", [pytest.param("shard", id="while-writing-shard-1"),
                                  pytest.param("manifest", id="before-shard-1-is-listed")])
def test_interrupted_build_resumes(parts, tmp_path, monkeypatch, when):
    rows = _rows(_batch(8, seed=3))
    _build(tmp_path / "whole", parts, rows)
    real = C._replace

    def interrupt(src, dst):
        name = os.path.basename(dst)
        if (when == "shard" and name == "shard-00001.safetensors") or (
                when == "manifest" and name == C.MANIFEST
                and os.path.exists(os.path.join(os.path.dirname(dst), "shard-00001.safetensors"))):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(C, "_replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "cut", parts, rows)
    monkeypatch.setattr(C, "_replace", real)
    listed = json.loads((tmp_path / "cut" / C.MANIFEST).read_text())["shards"]
    assert [s["index"] for s in listed] == [0]  # shard 1 is lost, never listed
    with pytest.raises(TeacherCacheError, match="incomplete.*interrupted"):
        TeacherCache(tmp_path / "cut")
    built = []
    orig = C._shard_tensors
    monkeypatch.setattr(C, "_shard_tensors", lambda t, r, *a: built.append(len(r)) or orig(t, r, *a))
    _build(tmp_path / "cut", parts, rows)
    assert built == [3, 2]  # shards 1 and 2 only
    a, b = _shard_tensors(tmp_path / "whole"), _shard_tensors(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert not [n for n in os.listdir(tmp_path / "cut") if ".tmp-" in n]  # the lost shard's
    TeacherCache(tmp_path / "cut", verify=True)


@pytest.mark.parametrize("kind", ["hidden", "topk"])
def test_cli_builds_the_same_cache(parts, tmp_path, capsys, kind):
    from muscle_fast.cli import main

    new_base, new_adapter, old_base, old_adapter = parts
    new_base.save_pretrained(tmp_path / "new_base")
    old_base.save_pretrained(tmp_path / "old_base")
    rows = _rows(_batch(8, seed=3))
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(json.dumps({k: v.tolist() for k, v in r.items()}) + "\n" for r in rows)
    topk = {"kind": "topk", "k": 8} if kind == "topk" else {}
    _build(tmp_path / "fn", parts, rows, **topk)
    rc = main(["cache-teachers", "--old-base", str(tmp_path / "old_base"), "--old-adapter",
               old_adapter, "--new-base", str(tmp_path / "new_base"), "--new-adapter", new_adapter,
               "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "cli"),
               "--rows-per-shard", "3", "--batch-size", "2", "--no-progress", "--kind", kind]
              + (["--k", "8"] if topk else []))
    assert rc == 0
    out = capsys.readouterr().out
    assert "8 rows" in out and "B/token" in out and "free" in out
    a, b = _shard_tensors(tmp_path / "fn"), _shard_tensors(tmp_path / "cli")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    ma = json.loads((tmp_path / "fn" / C.MANIFEST).read_text())
    mb = json.loads((tmp_path / "cli" / C.MANIFEST).read_text())
    assert ma["models"] == mb["models"] and ma["dataset"] == mb["dataset"]


def test_cli_help_says_which_kind():
    from muscle_fast.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["cache-teachers"]
    text = sub.format_help()
    for word in ("hidden", "topk", "exact", "--k", "--kind", "resum"):
        assert word in text, word


# ---------------------------------------------------------------- topk


def _topk_cache(parts, directory, k, rows=None, **kw):
    old, new = _teachers(parts)
    rows = rows if rows is not None else _rows(_batch(8, seed=3)) + _rows(_batch(4))
    build_teacher_cache(directory, rows, old_model=old, new_model=new, kind="topk", k=k,
                        rows_per_shard=5, batch_size=3, progress=False, log=lambda *_: None, **kw)
    return str(directory)


@pytest.fixture(scope="module")
def topk_cache(parts, tmp_path_factory):
    return _topk_cache(parts, tmp_path_factory.mktemp("topk"), 8)


@pytest.mark.parametrize("kw", [
    pytest.param({}, id="paper-defaults"),
    pytest.param({"mask": "token_likelihood", "ce_weight": 0.3}, id="token_likelihood-ce"),
    pytest.param({"mask": "old_correct", "fused_linear": False}, id="old_correct-materialised"),
])
def test_topk_with_k_equal_v_is_the_live_step(parts, tmp_path, kw):
    """k = V: no tail, the sparse teachers are the dense ones (float32 log-probabilities)."""
    d = _topk_cache(parts, tmp_path / "c", VOCAB)
    live = _live(parts)
    batch = _batch()
    peer = {**kw, "fused_linear": False, "impl": "torch"}
    ref = _run(copy.deepcopy(live).double(), batch, **peer)
    same = _run(live, batch, **peer)
    cached = _run(live.student, batch, teacher_cache=d, **kw)
    assert_pass_rule(cached[0], same[0], ref[0], torch.float32, "loss")
    for f in STAT_FIELDS:
        assert_pass_rule(getattr(cached[1], f), getattr(same[1], f), getattr(ref[1], f),
                         torch.float32, f"stats.{f}")
    for n in ref[2]:
        assert_pass_rule(cached[2][n[len("student."):]], same[2][n], ref[2][n], torch.float32,
                         f"grad {n}")


def test_topk_step_is_the_sparse_loss_of_the_live_teachers(parts, topk_cache):
    """k < V: the cached step equals fused_compat_loss with SparseTeacher.from_logits of the live
    teachers' logits (the cache stores exactly those teachers, rows in any order)."""
    from muscle_fast import SparseTeacher, fused_compat_loss

    live = _live(parts)
    b = _batch()
    b = {k: v[torch.tensor([3, 1, 0, 2])] for k, v in b.items()}
    kw = {"mask": "token_likelihood", "ce_weight": 0.3, "temperature": 2.0}
    cached = _run(live.student, b, teacher_cache=topk_cache, **kw)
    old, new = live.teacher_logits(b["input_ids"], b["attention_mask"])
    shifted = b["labels"][:, 1:]
    live.train()
    live.zero_grad(set_to_none=True)
    logits = live.student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    sp = [SparseTeacher.from_logits(t[:, :-1], k=8, temperature=2.0, labels=shifted)
          for t in (old, new)]
    loss, stats = fused_compat_loss(logits[:, :-1], shifted, sp[0], sp[1], impl="torch",
                                    return_stats=True, **kw)
    loss.backward()
    torch.testing.assert_close(cached[0], loss.detach(), rtol=1e-5, atol=1e-7)
    for f in STAT_FIELDS:
        torch.testing.assert_close(getattr(cached[1], f), getattr(stats, f), rtol=1e-5,
                                   atol=1e-7, msg=f)
    for n, p in live.student.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(cached[2][n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_trainer_from_topk_cache_holds_no_teacher_weights(parts, topk_cache, tmp_path):
    new_base, new_adapter, _, _ = parts
    model = _perturb(build_cached_compat_model(copy.deepcopy(new_base), new_adapter, topk_cache))
    assert model.old_head is None
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in model.student.parameters())
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = _trainer(model, tmp_path, CompatArguments(teacher_cache=topk_cache, chunk_size=8),
                       _rows(_batch(8, seed=3)))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in logs)
    assert all(0 <= h["compat/frac_to_old"] <= 1 for h in logs)
    assert any((p.detach() - w0[n]).abs().sum() > 0
               for n, p in model.named_parameters() if p.requires_grad)
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()


def test_topk_layout_and_size(topk_cache):
    cache = TeacherCache(topk_cache, verify=True)
    m = cache.manifest
    assert m["kind"] == "topk" and m["k"] == 8 and m["temperature"] == 2.0 and m["labels"]
    per = C.cache_size_estimate("topk", 1, k=8)
    assert per == 2 * (8 * 8 + 12)
    size = sum(s["bytes"] for s in m["shards"])
    assert m["n_tokens"] * per <= size <= m["n_tokens"] * per + 3 * 4096
    b = _batch()
    old, _ = cache.sparse(b["input_ids"], b["attention_mask"], b["labels"])
    assert old.shape == b["input_ids"].shape and old.k == 8
    p = old.logprobs.exp().sum(-1) + old.tail_logprob.exp()
    torch.testing.assert_close(p, torch.ones_like(p), rtol=0, atol=1e-5)


def test_topk_settings_are_checked(parts, topk_cache, tmp_path):
    live = _live(parts)
    b = _batch()
    with pytest.raises(TeacherCacheError, match="temperature 2.0, training uses 1.0"):
        _run(live.student, b, teacher_cache=topk_cache, temperature=1.0)
    other = {**b, "labels": b["labels"].clone()}
    other["labels"][0, 4] = (other["labels"][0, 4] + 1) % VOCAB
    with pytest.raises(TeacherCacheError, match="labels differ"):
        _run(live.student, other, teacher_cache=topk_cache, mask="token_likelihood")
    rows = [{k: v for k, v in r.items() if k != "labels"} for r in _rows(_batch(4))]
    d = _topk_cache(parts, tmp_path / "nolabels", 8, rows=rows)
    with pytest.raises(TeacherCacheError, match="built from rows without labels"):
        _run(live.student, b, teacher_cache=d, mask="sequence_likelihood")
    _run(live.student, b, teacher_cache=d)  # the muscle mask needs no label log-probabilities


# ---------------------------------------------------------------- every bad input: a named error


def test_batch_not_in_cache(parts, hidden_cache):
    live = _live(parts)
    b = _batch(seed=11)
    with pytest.raises(TeacherCacheError, match="not in the teacher cache"):
        _run(live.student, b, teacher_cache=hidden_cache)


def test_left_padding_is_named(parts, hidden_cache):
    live = _live(parts)
    b = _batch()
    b = {k: v.flip(1) for k, v in b.items()}
    with pytest.raises(TeacherCacheError, match="pad on the right"):
        _run(live.student, b, teacher_cache=hidden_cache)


def test_labels_on_padding_are_named(parts, hidden_cache):
    live = _live(parts)
    b = _batch()
    b["labels"][0, -1] = 5
    with pytest.raises(TeacherCacheError, match="labels outside its attention mask"):
        _run(live.student, b, teacher_cache=hidden_cache)


def test_truncated_or_missing_files_are_named(parts, tmp_path):
    rows = _rows(_batch(8, seed=3))
    d = tmp_path / "c"
    _build(d, parts, rows)
    shard = d / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(TeacherCacheError, match="shard-00001.*truncated"):
        TeacherCache(d)
    shard.write_bytes(data[:50] + bytes(len(data) - 50))  # same size, damaged
    with pytest.raises(TeacherCacheError, match="shard-00001"):
        TeacherCache(d, verify=True)
    shard.unlink()
    with pytest.raises(TeacherCacheError, match="shard-00001.*missing"):
        TeacherCache(d)
    with pytest.raises(TeacherCacheError, match="not a teacher cache"):
        TeacherCache(tmp_path)
    with pytest.raises(TeacherCacheError, match="does not exist"):
        TeacherCache(tmp_path / "nowhere")
    m = json.loads((d / C.MANIFEST).read_text())
    m["format_version"] = 99
    (d / C.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(TeacherCacheError, match="format version 99"):
        TeacherCache(d)


def test_rebuilding_a_damaged_shard(parts, tmp_path):
    rows = _rows(_batch(8, seed=3))
    d = tmp_path / "c"
    _build(d, parts, rows)
    want = _shard_tensors(d)
    shard = d / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _build(d, parts, rows)  # the build again: the truncated shard is rebuilt
    got = _shard_tensors(d)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_mismatched_models_are_named(parts, hidden_cache, tmp_path):
    new_base, new_adapter, old_base, old_adapter = parts
    with pytest.raises(TeacherCacheError, match="base weights"):
        build_cached_compat_model(copy.deepcopy(old_base), old_adapter, hidden_cache)
    other = _adapter(new_base, 7, tmp_path / "other")
    with pytest.raises(TeacherCacheError, match="new_adapter is not the new task adapter"):
        build_cached_compat_model(copy.deepcopy(new_base), other, hidden_cache)
    small = _llama(2, vocab=VOCAB - 1)
    student = get_peft_model(small, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TeacherCacheError, match="vocabulary of 95.*built at 96"):
        CachedCompatModel(student, hidden_cache)
    head = C.TeacherCache(hidden_cache)
    heads = os.path.join(hidden_cache, C.HEADS)
    keep = Path(heads).read_bytes()
    try:
        from safetensors.torch import load_file, save_file

        t = load_file(heads)
        t["old.weight"] = t["old.weight"] * 2
        save_file(t, heads)
        with pytest.raises(TeacherCacheError, match="old head"):
            build_cached_compat_model(copy.deepcopy(new_base), new_adapter, hidden_cache)
    finally:
        Path(heads).write_bytes(keep)
    del head


def test_bad_build_arguments_are_named(parts, hidden_cache, tmp_path):
    rows = _rows(_batch(4))
    with pytest.raises(TeacherCacheError, match="kind must be one of"):
        _build(tmp_path / "a", parts, rows, kind="logits")
    with pytest.raises(TeacherCacheError, match="k is a setting of kind='topk'"):
        _build(tmp_path / "a", parts, rows, k=8)
    with pytest.raises(TeacherCacheError, match="temperature"):
        _build(tmp_path / "a", parts, rows, temperature=0.0)
    with pytest.raises(TeacherCacheError, match="another build.*dataset"):
        _build(hidden_cache, parts, rows)  # another dataset into an existing cache
    bad = _rows(_batch(2))
    bad[1]["attention_mask"] = bad[1]["attention_mask"].flip(0)
    with pytest.raises(TeacherCacheError, match="row 1.*pad on the right"):
        _build(tmp_path / "b", parts, bad)
    with pytest.raises(TeacherCacheError, match="empty"):
        _build(tmp_path / "b", parts, [])


def test_hidden_needs_plain_heads(tmp_path):
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=HID, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       max_position_embeddings=64, final_logit_softcapping=1.5,
                       attn_implementation="eager")
    m = Gemma2ForCausalLM(cfg).eval()
    with pytest.raises(TeacherCacheError, match="softcapping.*kind='topk'"):
        build_teacher_cache(tmp_path, _rows(_batch(2)), old_model=m, new_model=m,
                            progress=False, log=lambda *_: None)


# ---------------------------------------------------------------- a real model (slow)


@pytest.mark.slow
def test_smollm2_trains_from_both_caches(tmp_path):
    """SmolLM2-135M-Instruct (V=49152): old = the base with its final norm scaled by 1.15 + an old
    LoRA adapter, new = the base + a new one. From a hidden cache a step passes the rule against
    the live step and two CompatTrainer steps log what the live teachers log; a topk (k=128) cache
    trains too; neither run loads the old body."""
    from test_train_fused import SMOL_GGUF, _smollm2_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _smollm2_dir()
    base = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOL_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOL_GGUF)
    old_base = copy.deepcopy(base)
    with torch.no_grad():
        old_base.model.norm.weight.mul_(1.15)
    adapters = {}
    for name, model, seed in (("old", old_base, 1), ("new", base, 2)):
        torch.manual_seed(seed)
        m = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
            init_lora_weights=False))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        m.save_pretrained(str(tmp_path / name))
        adapters[name] = str(tmp_path / name)
    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    ids = tok(Path(readme).read_text(), return_tensors="pt")["input_ids"][0][:4 * 64].reshape(4, 64)
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rows = _rows(batch)
    old_t = PeftModel.from_pretrained(copy.deepcopy(old_base), adapters["old"]).eval()
    new_t = PeftModel.from_pretrained(copy.deepcopy(base), adapters["new"]).eval()
    caches = {}
    for kind, k in (("hidden", None), ("topk", 128)):
        caches[kind] = str(tmp_path / kind)
        build_teacher_cache(caches[kind], rows, old_model=old_t, new_model=new_t, kind=kind, k=k,
                            tokenizer=tok, progress=False, log=lambda *_: None)
    del old_t, new_t
    assert TeacherCache(caches["hidden"]).manifest["vocab_size"] == 49152

    live = build_compat_model(copy.deepcopy(base), adapters["new"], copy.deepcopy(old_base),
                              adapters["old"])
    _perturb(live)
    small = {k: v[:2, :32] for k, v in batch.items()}
    small_rows = _rows(small)
    d = str(tmp_path / "small")
    build_teacher_cache(d, small_rows, old_model=live.old_model,
                        new_model=PeftModel.from_pretrained(copy.deepcopy(base), adapters["new"]),
                        progress=False, log=lambda *_: None)
    kw = {"ce_weight": 0.2}
    peer = {**kw, "fused_linear": False, "impl": "torch"}
    ref = _run(copy.deepcopy(live).double(), small, **peer)
    same = _run(live, small, **peer)
    cached = _run(live.student, small, teacher_cache=d, **kw)
    assert_pass_rule(cached[0], same[0], ref[0], torch.float32, "smollm2 loss")
    for f in STAT_FIELDS:
        assert_pass_rule(getattr(cached[1], f), getattr(same[1], f), getattr(ref[1], f),
                         torch.float32, f"smollm2 stats.{f}")
    for n in ref[2]:
        assert_pass_rule(cached[2][n[len("student."):]], same[2][n], ref[2][n], torch.float32,
                         f"smollm2 grad {n}")
    del ref

    results = {}
    for name in ("live", "hidden", "topk"):
        if name == "live":
            model = _perturb(build_compat_model(copy.deepcopy(base), adapters["new"],
                                                copy.deepcopy(old_base), adapters["old"]))
            ca = CompatArguments(ce_weight=0.2)
        else:
            model = _perturb(build_cached_compat_model(copy.deepcopy(base), adapters["new"],
                                                       caches[name], tokenizer=tok))
            assert model.old_head is None or model.old_head.weight.shape == (49152, 576)
            assert not hasattr(model, "old_model") or model.old_model is None
            ca = CompatArguments(ce_weight=0.2, teacher_cache=caches[name])
        w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                                 max_steps=2, logging_steps=1, learning_rate=1e-3, optim="sgd",
                                 save_strategy="no", report_to=[], seed=0, use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0)
        trainer = CompatTrainer(model, args, train_dataset=rows, compat_args=ca)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        dw = {n: p.detach() - w0[n] for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (logs, dw)
        del model, trainer
    (ll, ldw), (hl, hdw), (tl, tdw) = results["live"], results["hidden"], results["topk"]
    assert len(ll) == len(hl) == len(tl) == 2
    for a, b in zip(hl, ll):
        for k in [k for k in b if k == "loss" or k.startswith("compat/")]:
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])
    for n in ldw:
        torch.testing.assert_close(hdw[n], ldw[n], rtol=1e-3, atol=1e-7, msg=n)
    assert all(math.isfinite(h["loss"]) for h in tl)
    assert any(d.abs().sum() > 0 for d in tdw.values())


def test_cli_names_a_bad_input(tmp_path, capsys):
    from muscle_fast.cli import main

    (tmp_path / "data.jsonl").write_text('{"input_ids": [1, 2, 3]}\nnot json\n')
    rc = main(["cache-teachers", "--old-base", str(tmp_path), "--new-base", str(tmp_path),
               "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "c")])
    assert rc == 2
    assert "data.jsonl:2: not JSON" in capsys.readouterr().err
