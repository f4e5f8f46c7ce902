"""muscle_fast.metrics: the paper's flip metrics on hand-computed cases, ROUGE-1 through
rouge-score, and the multiple-choice scorer on a real tiny Llama (plain and peft-wrapped)."""

import math

import numpy as np
import pytest
import torch

from muscle_fast import metrics as M


def test_discriminative_hand_computed():
    old = [1, 1, 0, 1, 0, 0]
    new = [1, 0, 1, 0, 0, 0]
    old_pred = ["A", "B", "C", "A", "B", "C"]
    new_pred = ["A", "C", "C", "A", "B", "A"]
    r = M.discriminative_flips(old, new, old_pred, new_pred)
    assert r.n == 6
    assert r.acc_old == pytest.approx(3 / 6) and r.acc_new == pytest.approx(2 / 6)
    assert r.nfr == pytest.approx(2 / 6)  # items 1, 3
    assert r.pfr == pytest.approx(1 / 6)  # item 2
    # new wrong: 1, 3, 4, 5; answer changed among them: 1 (B->C), 5 (C->A)
    assert r.nfr_mc == pytest.approx(2 / 6)
    assert (r.n_negative, r.n_positive) == (2, 1)


def test_discriminative_accepts_tensors_and_bools():
    r = M.discriminative_flips(
        torch.tensor([True, False]), np.array([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 1])
    )
    # item 0: old right, new wrong with another answer (0 -> 2); item 1: a positive flip
    assert (r.nfr, r.pfr, r.nfr_mc) == (0.5, 0.5, 0.5)
    assert M.discriminative_flips([1, 0], [0, 0]).nfr_mc is None


@pytest.mark.parametrize(
    "args, err",
    [
        pytest.param(([1, 0], [1]), "one value per instance", id="length"),
        pytest.param(([], []), "no instances", id="empty"),
        pytest.param(([1, 2], [1, 0]), "0/1", id="not-binary"),
        pytest.param(([1, 0], [1, 0], [1, 0], None), "both", id="one-pred"),
        pytest.param(([1, 0], [1, 0], [1], [1, 0]), "need 2 values", id="pred-length"),
        pytest.param(([[1, 0]], [[1, 0]]), "1-D", id="2d"),
    ],
)
def test_discriminative_errors(args, err):
    with pytest.raises(ValueError, match=err):
        M.discriminative_flips(*args)


def test_generative_hand_computed():
    old = [0.5, 0.2, 1.0, 0.0, 0.3]
    new = [0.75, 0.2, 0.4, 0.0, 0.1]
    r = M.generative_flips(old, new)  # D = +.25, 0, -.6, 0, -.2
    assert r.pfr == pytest.approx(1 / 5) and r.nfr == pytest.approx(2 / 5)
    assert r.m_g == pytest.approx(0.25)
    assert r.m_r == pytest.approx(0.4)  # mean(0.6, 0.2), a magnitude
    assert r.score_old == pytest.approx(0.4) and r.score_new == pytest.approx(0.29)


def test_generative_no_flips_is_zero_not_nan():
    r = M.generative_flips([0.3, 0.7], [0.3, 0.7])
    assert (r.pfr, r.nfr, r.m_g, r.m_r) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        M.generative_flips([0.3, float("nan")], [0.3, 0.7])


def test_binary_scores_agree_across_definitions():
    rng = np.random.default_rng(0)
    o, w = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    d, g = M.discriminative_flips(o, w), M.generative_flips(o, w)
    assert (d.nfr, d.pfr, d.acc_old, d.acc_new) == (g.nfr, g.pfr, g.score_old, g.score_new)


def test_compat_deltas_hand_computed():
    old = [1, 1, 1, 0, 0]
    new = [0, 0, 1, 1, 0]  # NFR 2/5, acc 2/5
    cmp_ = [1, 0, 1, 1, 1]  # NFR_c 1/5, acc 4/5
    c = M.compat_deltas(old, new, cmp_)
    assert c.nfr_c == pytest.approx(0.2)
    assert c.dnfr_c == pytest.approx(-0.2)
    assert c.dpct_nfr_c == pytest.approx(-0.5)
    assert c.dacc_c == pytest.approx(0.4)
    assert (c.dm_g, c.dm_r) == (0.0, 0.0)  # binary: every flip is a full point
    g = M.compat_deltas([0.5, 0.5], [0.1, 0.9], [0.4, 0.6])
    assert g.dm_r == pytest.approx(0.1 - 0.4) and g.dm_g == pytest.approx(0.1 - 0.4)


def test_relative_change_at_zero_nfr():
    assert M.relative_change(0.0, 0.0) == 0.0
    assert M.relative_change(0.1, 0.0) == math.inf
    assert M.relative_change(-0.1, 0.2) == pytest.approx(-0.5)
    c = M.compat_deltas([1, 1], [1, 1], [1, 0])
    assert c.dpct_nfr_c == math.inf and c.nfr_c == 0.5


def test_rouge1_matches_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["the cat sat", "a b c", "Hello, World!", ""]
    refs = ["the cat sat on the mat", "x y z", "hello world", "nothing"]
    got = M.rouge1(preds, refs)
    sc = rouge_scorer.RougeScorer(["rouge1"])
    assert got == [sc.score(r, p)["rouge1"].fmeasure for p, r in zip(preds, refs)]
    assert got[0] == pytest.approx(2 / 3) and got[1] == 0.0 and got[2] == 1.0 and got[3] == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        M.rouge1(["a"], [])


# ---------------------------------------------------------------- multiple-choice scoring


@pytest.fixture(scope="module")
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [
        "what",
        "is",
        "the",
        "capital",
        "of",
        "france",
        "paris",
        "london",
        "rome",
        "berlin",
        "a",
        "b",
        "c",
        "?",
    ]
    vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
    )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    return transformers.LlamaForCausalLM(cfg), hf_tok


CONTEXTS = ["what is the capital of france ?", "a b", "the capital of rome is"]
CHOICES = [[" paris", " london", " rome berlin"], [" c", " a b c"], [" paris", " the capital"]]


def _manual(model, tok, ctx, choice):
    ctx_ids = tok(ctx, add_special_tokens=True)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx_ids + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(ctx_ids) - 1 + j, t].item() for j, t in enumerate(cont)), len(cont)


@pytest.mark.parametrize(
    "batch_size",
    [pytest.param(1, id="bs1"), pytest.param(3, id="bs3"), pytest.param(16, id="bs16")],
)
def test_mc_loglikelihoods_match_unbatched_forward(tiny_lm, batch_size):
    model, tok = tiny_lm
    ll, n = M.mc_loglikelihoods(model, tok, CONTEXTS, CHOICES, batch_size=batch_size)
    assert ll.shape == (3, 3) and n.shape == (3, 3)
    for d, chs in enumerate(CHOICES):
        for c, ch in enumerate(chs):
            ref, k = _manual(model, tok, CONTEXTS[d], ch)
            assert ll[d, c].item() == pytest.approx(ref, abs=1e-4)
            assert n[d, c].item() == k
    assert ll[1, 2].item() == -math.inf and n[1, 2].item() == 0  # item 1 has two choices
    assert torch.equal(M.mc_predict(ll), torch.argmax(ll, -1))
    norm = M.mc_predict(ll, n, normalize=True)
    expect = [
        int(np.argmax([ll[d, c].item() / n[d, c].item() for c in range(len(chs))]))
        for d, chs in enumerate(CHOICES)
    ]
    assert norm.tolist() == expect


def test_mc_predict_normalisation_changes_choice():
    ll = torch.tensor([[-3.0, -4.0]])
    n = torch.tensor([[1, 4]])
    assert M.mc_predict(ll).tolist() == [0]
    assert M.mc_predict(ll, n, normalize=True).tolist() == [1]  # -3 / 1 < -4 / 4
    assert M.mc_predict(torch.tensor([[-1.0, -1.0]])).tolist() == [0]  # ties: lowest index
    with pytest.raises(ValueError, match="needs n_tokens"):
        M.mc_predict(ll, normalize=True)


def test_mc_loglikelihoods_peft_model_and_mode_restored(tiny_lm):
    peft = pytest.importorskip("peft")
    model, tok = tiny_lm
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    try:
        lora.train()
        ll, _n = M.mc_loglikelihoods(lora, tok, CONTEXTS, CHOICES, batch_size=4)
        assert lora.training  # mode restored
        ref, _ = _manual(lora, tok, CONTEXTS[0], CHOICES[0][1])
        assert ll[0, 1].item() == pytest.approx(ref, abs=1e-4)
        with lora.disable_adapter():
            base, _ = M.mc_loglikelihoods(lora, tok, CONTEXTS, CHOICES)
        assert not torch.allclose(base, ll)  # the adapter is in the scored path
    finally:
        lora.unload()


def test_mc_loglikelihoods_errors(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ValueError, match="2 contexts but 1"):
        M.mc_loglikelihoods(model, tok, ["a", "b"], [[" c"]])
    with pytest.raises(ValueError, match="no choices"):
        M.mc_loglikelihoods(model, tok, ["a"], [[]])
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        M.mc_loglikelihoods(model, tok, ["a"], [[""]])
