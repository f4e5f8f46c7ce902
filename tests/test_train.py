"""MUSCLE training on real tiny parts: LlamaForCausalLM from a config, peft LoRA, transformers.Trainer."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from muscle_fast.train import (
    CompatArguments,
    CompatTrainer,
    build_compat_model,
    compat_loss,
    compat_training_step,
)
from muscle_fast.train.model import COMPAT_ADAPTER, TEACHER_ADAPTER

VOCAB, SEQ = 96, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def _base(seed, vocab=VOCAB):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _adapter(base, seed, path):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                     lora_dropout=0.0, init_lora_weights=False)  # random A and B: a real task adapter
    m = get_peft_model(base, cfg)
    m.save_pretrained(str(path))
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    for name, seed in (("old", 1), ("new", 2)):
        _base(seed).save_pretrained(d / f"{name}_base")
        _adapter(_base(seed), seed + 10, d / f"{name}_adapter")
    return d


def _build(saved):
    return build_compat_model(str(saved / "new_base"), str(saved / "new_adapter"),
                              str(saved / "old_base"), str(saved / "old_adapter"))


def _dataset(n, seed=0):
    """Rows of varying length (padding at the end, labels -100 there and on a 3-token prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (i * 3) % (SEQ - 4)
        ids = torch.randint(1, VOCAB, (SEQ,), generator=g)
        attn = (torch.arange(SEQ) < length).long()
        labels = torch.where(attn.bool(), ids, torch.full_like(ids, -100))
        labels[:3] = -100
        rows.append({"input_ids": ids * attn, "attention_mask": attn, "labels": labels})
    return rows


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _params(model, adapter):
    return {n: p.detach().clone() for n, p in model.student.named_parameters()
            if f".{adapter}." in n}


def _args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                "max_steps": 2, "logging_steps": 1, "save_strategy": "no", "report_to": [], "seed": 0,
                "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0}
    base.update(kw)
    return TrainingArguments(**base)


def test_assembly_teachers_frozen_and_logits(saved):
    model = _build(saved)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{COMPAT_ADAPTER}." in n for n in trainable)
    batch = _collate(_dataset(3))
    old, new = model.teacher_logits(batch["input_ids"], batch["attention_mask"])
    # the new teacher equals the new task model assembled the plain peft way
    ref_new = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(saved / "new_base"),
                                        str(saved / "new_adapter")).eval()
    ref_old = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(saved / "old_base"),
                                        str(saved / "old_adapter")).eval()
    with torch.no_grad():
        exp_new = ref_new(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        exp_old = ref_old(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(new, exp_new)
    torch.testing.assert_close(old, exp_old)
    assert not torch.allclose(old, new)
    # before training the student (copy of the new adapter) is the new teacher
    with torch.no_grad():
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(student, new)
    # no second copy of the new base: one set of base weights in the student
    n_q = sum(1 for n, _ in model.student.named_parameters() if n.endswith("q_proj.base_layer.weight"))
    assert n_q == 2


def test_vocabulary_mismatch_is_an_error(saved, tmp_path):
    _base(3, vocab=VOCAB + 8).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="share one tokenizer"):
        build_compat_model(str(saved / "new_base"), str(saved / "new_adapter"),
                           str(tmp_path / "other"))


def test_loss_gradients_only_on_compat_adapter(saved):
    model = _build(saved)
    model.train()
    batch = _collate(_dataset(4))
    # perturb the student away from the new teacher so both KL terms are non-trivial
    with torch.no_grad():
        for p in model.compat_parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, stats = compat_loss(model, batch, CompatArguments())
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert 0 < stats.frac_to_old.item() <= 1
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert any(f".{TEACHER_ADAPTER}." in n for n, _ in model.named_parameters())


def test_trainer_two_steps_save_reload(saved, tmp_path):
    model = _build(saved)
    teacher0, compat0 = _params(model, TEACHER_ADAPTER), _params(model, COMPAT_ADAPTER)
    old0 = {n: p.detach().clone() for n, p in model.old_model.named_parameters()}
    trainer = CompatTrainer(model, _args(tmp_path / "run"), train_dataset=_dataset(4),
                            data_collator=_collate, compat_args=CompatArguments())
    trainer.train()
    teacher1, compat1 = _params(model, TEACHER_ADAPTER), _params(model, COMPAT_ADAPTER)
    for n in teacher0:
        assert torch.equal(teacher0[n], teacher1[n]), n
    for n, p in model.old_model.named_parameters():
        assert torch.equal(old0[n], p), n
    assert any(not torch.equal(compat0[n], compat1[n]) for n in compat0)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for key in ("compat/frac_to_old", "compat/acc_student", "compat/acc_old", "compat/kl_old",
                "compat/kl_new", "compat/ce"):
        assert key in logged[0] and math.isfinite(logged[0][key]), key

    out = tmp_path / "compat_adapter"
    trainer.save_model(str(out))
    files = {p.name for p in out.iterdir()}
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert not (out / TEACHER_ADAPTER).exists()
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(saved / "new_base"),
                                         str(out)).eval()
    batch = _collate(_dataset(2, seed=5))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want)


def _grads_after_one_step(saved, tmp_path, bs, ga):
    model = _build(saved)
    w0 = _params(model, COMPAT_ADAPTER)
    args = _args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                 max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                 max_grad_norm=0.0, weight_decay=0.0)
    CompatTrainer(model, args, train_dataset=_dataset(4, seed=3), data_collator=_collate).train()
    w1 = _params(model, COMPAT_ADAPTER)
    return {n: w0[n] - w1[n] for n in w0}  # lr 1, plain SGD: the applied gradient


def test_gradient_accumulation_matches_big_batch(saved, tmp_path):
    big = _grads_after_one_step(saved, tmp_path / "a", bs=4, ga=1)
    acc = _grads_after_one_step(saved, tmp_path / "b", bs=2, ga=2)
    assert any(g.abs().sum() > 0 for g in big.values())
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-6, msg=n)


def test_plain_loop_accumulation_matches_big_batch(saved):
    rows = _dataset(4, seed=7)
    grads = []
    for chunks in ([rows], [rows[:2], rows[2:]]):
        model = _build(saved)
        total = sum(int((r["labels"][1:] != -100).sum()) for r in rows)
        for c in chunks:
            out = compat_training_step(model, _collate(c), None, num_items=total)
            assert set(out) >= {"loss", "frac_to_old", "kl_old"}
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_from_checkpoint_gives_same_weights(saved, tmp_path):
    def args(out):
        return _args(out, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-3)

    data = _dataset(12, seed=11)
    full = _build(saved)
    CompatTrainer(full, args(tmp_path / "full"), train_dataset=data, data_collator=_collate).train()

    first = _build(saved)
    CompatTrainer(first, args(tmp_path / "cut"), train_dataset=data, data_collator=_collate,
                  callbacks=[_StopAt(2)]).train()
    ckpt = tmp_path / "cut" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    cut_w = _params(first, COMPAT_ADAPTER)
    full_w = _params(full, COMPAT_ADAPTER)
    assert any(not torch.equal(cut_w[n], full_w[n]) for n in cut_w)  # it really stopped early

    resumed = _build(saved)  # fresh process state: weights come from the checkpoint
    CompatTrainer(resumed, args(tmp_path / "cut"), train_dataset=data,
                  data_collator=_collate).train(resume_from_checkpoint=str(ckpt))
    res_w = _params(resumed, COMPAT_ADAPTER)
    for n in full_w:
        torch.testing.assert_close(res_w[n], full_w[n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("options,exc,match", [
    pytest.param({"mask": "musle"}, ValueError, "mask", id="mask-name"),
    pytest.param({"temperature": 0}, ValueError, "temperature", id="temperature-zero"),
    pytest.param({"kl_weight": -1.0}, ValueError, "kl_weight", id="kl-negative"),
    pytest.param({"kl_weight": 0.0}, ValueError, "both 0", id="weights-both-zero"),
    pytest.param({"impl": "gpu"}, ValueError, "impl", id="impl-name"),
    pytest.param({"inplace_backward": 1}, TypeError, "inplace_backward", id="inplace-int"),
    pytest.param({"fused_linear": "yes"}, TypeError, "fused_linear", id="fused-linear-str"),
    pytest.param({"chunk_size": 0}, ValueError, "chunk_size", id="chunk-size-zero"),
])
def test_compat_arguments_checked_when_constructed(options, exc, match):
    """A bad option is refused where it is written, before any model is loaded."""
    with pytest.raises(exc, match=match):
        CompatArguments(**options)


def test_materialised_path_refuses_inplace_on_overlapping_logits():
    """CompatArguments(inplace_backward=True) (the default) on logits whose elements share memory:
    refused by the loss's one check, never a wrong number (issue 23 item 1)."""
    from muscle_fast.train.model import _materialised_loss

    p = torch.randn(VOCAB, requires_grad=True)
    logits = (p * 1).expand(2, SEQ, VOCAB)
    old, new = torch.randn(2, SEQ, VOCAB), torch.randn(2, SEQ, VOCAB)
    labels = torch.randint(0, VOCAB, (2, SEQ))
    args = CompatArguments(fused_linear=False)
    assert args.inplace_backward
    with pytest.raises(ValueError, match="inplace_backward.*logits.*share memory"):
        _materialised_loss(logits, old, new, labels, args, None)


def test_build_from_peft_models_on_the_given_bases_warns_nothing(saved):
    """PeftModel objects made on the very bases passed (the natural way to hold task models): no
    peft "Already found a `peft_config`" warning (it came from injecting the adapters a second
    time, issue 23 item 11), one set of LoRA layers per adapter, the teachers of the directories."""
    import warnings

    new_base = LlamaForCausalLM.from_pretrained(saved / "new_base")
    old_base = LlamaForCausalLM.from_pretrained(saved / "old_base")
    new_task = PeftModel.from_pretrained(new_base, str(saved / "new_adapter"))
    old_task = PeftModel.from_pretrained(old_base, str(saved / "old_adapter"), adapter_name="task")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = build_compat_model(new_base, new_task, old_base, old_task)
    assert not [w for w in seen if "peft_config" in str(w.message)], [str(w.message) for w in seen]
    ref = _build(saved)

    def n_lora(m):
        return sum("lora_A" in n for n, _ in m.named_parameters())

    assert n_lora(model.old_model) == n_lora(ref.old_model)
    assert n_lora(model.student) == n_lora(ref.student)
    batch = _collate(_dataset(3))
    for got, want in zip(model.teacher_logits(batch["input_ids"], batch["attention_mask"]),
                         ref.teacher_logits(batch["input_ids"], batch["attention_mask"])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

