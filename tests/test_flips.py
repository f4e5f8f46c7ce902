"""`muscle-fast flips` on real lm-evaluation-harness sample logs and on plain JSONL files.

The lm-eval logs are produced here, offline, by lm_eval.simple_evaluate on tiny random Llama
models saved to a temp dir, over local JSONL tasks; the file writer is lm-eval's own
EvaluationTracker.save_results_samples, as `lm_eval --log_samples` uses it.
"""

import json
import os
import random

import numpy as np
import pytest

from muscle_fast import flips as F
from muscle_fast.cli import main

WORDS = ["red", "blue", "green", "black", "white", "pink", "gray", "brown", "gold", "teal"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------- real lm-eval logs


@pytest.fixture(scope="module")
def lm_eval_logs(tmp_path_factory):
    """{model_name: {"mc": path, "gen": path}} for three tiny models (old, new, compat)."""
    pytest.importorskip("lm_eval")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm_eval")
    vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3}
    for w in WORDS + [
        "what",
        "color",
        "is",
        "the",
        "sky",
        "grass",
        "cat",
        "dog",
        "sea",
        "sun",
        "?",
    ]:
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

    rng = random.Random(0)
    docs = []
    for i in range(12):
        choices = rng.sample(WORDS, 3)
        obj = ["sky", "grass", "cat", "dog", "sea", "sun"][i % 6]
        docs.append(
            {
                "question": f"what color is the {obj} ?",
                "choices": choices,
                "label": i % 3,
                "answer": choices[i % 3],
            }
        )
    data = _write_jsonl(root / "data.jsonl", docs)
    tasks = root / "tasks"
    tasks.mkdir()
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\ndoc_to_text: "{{question}}"\n'
    )
    (tasks / "mc.yaml").write_text(
        "task: flips_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (tasks / "gen.yaml").write_text(
        "task: flips_gen\n" + common + "output_type: generate_until\ndoc_to_target: answer\n"
        'generation_kwargs:\n  until: ["?"]\n  max_gen_toks: 2\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )

    out = {}
    task_manager = TaskManager(include_path=str(tasks))  # indexes every lm_eval task: build it once
    for name, seed in (("old", 1), ("new", 2), ("compat", 3)):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
        mdir = root / f"model_{name}"
        transformers.LlamaForCausalLM(cfg).save_pretrained(mdir)
        hf_tok.save_pretrained(mdir)
        tracker = EvaluationTracker(output_path=str(root / f"logs_{name}"))
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={mdir},tokenizer={mdir}",
            tasks=["flips_mc", "flips_gen"],
            task_manager=task_manager,
            log_samples=True,
            device="cpu",
            batch_size=8,
            evaluation_tracker=tracker,
        )
        tracker.save_results_aggregated(results=res, samples=res["samples"])
        for t in res["configs"]:
            tracker.save_results_samples(task_name=t, samples=res["samples"][t])
        files = sorted((root / f"logs_{name}").rglob("samples_*.jsonl"))
        out[name] = {
            "mc": next(f for f in files if "flips_mc" in f.name),
            "gen": next(f for f in files if "flips_gen" in f.name),
        }
    out["lm_eval_version"] = lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?"
    return out


def _load(path):
    return [json.loads(line) for line in open(path)]


def _expected_mc(old_rows, new_rows, field="acc"):
    """Independent recomputation from the raw sample records, matched by doc_id."""
    old = {r["doc_id"]: r for r in old_rows}
    new = {r["doc_id"]: r for r in new_rows}
    ids = sorted(old)
    o = np.array([old[i][field] for i in ids]) == 1
    w = np.array([new[i][field] for i in ids]) == 1

    def ans(r):
        return int(np.argmax([float(x[0]) for x in r["filtered_resps"]]))

    diff = np.array([ans(old[i]) != ans(new[i]) for i in ids])
    return {
        "acc_old": o.mean(),
        "acc_new": w.mean(),
        "nfr": (o & ~w).mean(),
        "pfr": (~o & w).mean(),
        "nfr_mc": (~w & diff).mean(),
    }


def test_lm_eval_log_schema(lm_eval_logs):
    rec = _load(lm_eval_logs["old"]["mc"])[0]
    for key in (
        "doc_id",
        "doc",
        "target",
        "arguments",
        "resps",
        "filtered_resps",
        "filter",
        "metrics",
        "doc_hash",
        "acc",
        "acc_norm",
    ):
        assert key in rec
    assert len(_load(lm_eval_logs["old"]["mc"])) == 12


def test_flips_on_lm_eval_mc_logs(lm_eval_logs, tmp_path, capsys):
    L = lm_eval_logs
    out_json = tmp_path / "out.json"
    rc, out, err = _run(
        [
            "flips",
            "--old",
            str(L["old"]["mc"]),
            "--new",
            str(L["new"]["mc"]),
            "--compat",
            str(L["compat"]["mc"]),
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert rc == 0, err
    rep = json.loads(out_json.read_text())
    exp = _expected_mc(_load(L["old"]["mc"]), _load(L["new"]["mc"]))
    for k, v in exp.items():
        assert rep[k] == pytest.approx(v), k
    expc = _expected_mc(_load(L["old"]["mc"]), _load(L["compat"]["mc"]))
    assert rep["nfr_c"] == pytest.approx(expc["nfr"])
    assert rep["acc_c"] == pytest.approx(expc["acc_new"])
    assert rep["dnfr_c"] == pytest.approx(expc["nfr"] - exp["nfr"])
    assert rep["dacc_c"] == pytest.approx(expc["acc_new"] - exp["acc_new"])
    assert rep["n"] == 12 and rep["kind"] == "discriminative"
    # the random models do disagree: the test exercises real flips, not all-zero rates
    assert rep["nfr"] + rep["pfr"] + rep["nfr_c"] > 0
    counts = rep["counts"]  # labelled: "old correct, new wrong, compat correct" -> instances
    assert len(counts) == 8 and sum(counts.values()) == 12
    negative = [k for k in counts if k.startswith("old correct, new wrong, ")]
    assert len(negative) == 2 and sum(counts[k] for k in negative) == round(12 * exp["nfr"])
    assert "NFR_mc" in out and "compat (Mv2C)" in out


def test_lm_eval_logs_matched_by_doc_id(lm_eval_logs, tmp_path):
    L = lm_eval_logs
    rows = _load(L["new"]["mc"])
    shuffled = list(reversed(rows))
    assert [r["doc_id"] for r in shuffled] != [r["doc_id"] for r in rows]
    p = tmp_path / "samples_flips_mc_shuffled.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in shuffled))
    logs = {"old": F.read_eval_log(L["old"]["mc"]), "new": F.read_eval_log(p)}
    keys, dropped = F.align_logs(logs)
    rep = F.flip_report(logs, keys, dropped)
    exp = _expected_mc(_load(L["old"]["mc"]), rows)
    for k, v in exp.items():
        assert rep[k] == pytest.approx(v), k
    # a log of other documents under the same doc_ids is refused (doc_hash differs)
    rows2 = [dict(r, doc_hash="0" * 64 if r["doc_id"] == 3 else r["doc_hash"]) for r in rows]
    p2 = _write_jsonl(tmp_path / "samples_other.jsonl", rows2)
    with pytest.raises(F.FlipsInputError, match=r"1 instance\(s\) have a different doc_hash.*3"):
        F.align_logs({"old": F.read_eval_log(L["old"]["mc"]), "new": F.read_eval_log(p2)})


def test_lm_eval_acc_norm_answers(lm_eval_logs):
    """acc_norm answers (argmax of ll / len(choice)) agree with the logged acc_norm."""
    log = F.read_eval_log(lm_eval_logs["new"]["mc"], metric="acc_norm")
    assert log.preds is not None, log.pred_note
    for r in _load(lm_eval_logs["new"]["mc"]):
        assert (log.preds[r["doc_id"]] == int(r["target"])) == (r["acc_norm"] == 1.0)


def test_lm_eval_generation_logs(lm_eval_logs, tmp_path, capsys):
    from rouge_score import rouge_scorer

    L = lm_eval_logs
    out_json = tmp_path / "gen.json"
    rc, _out, err = _run(
        [
            "flips",
            "--old",
            str(L["old"]["gen"]),
            "--new",
            str(L["new"]["gen"]),
            "--metric",
            "rouge1",
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert rc == 0, err
    rep = json.loads(out_json.read_text())
    sc = rouge_scorer.RougeScorer(["rouge1"])
    old = {
        r["doc_id"]: sc.score(r["target"], r["filtered_resps"][0])["rouge1"].fmeasure
        for r in _load(L["old"]["gen"])
    }
    new = {
        r["doc_id"]: sc.score(r["target"], r["filtered_resps"][0])["rouge1"].fmeasure
        for r in _load(L["new"]["gen"])
    }
    d = np.array([new[i] - old[i] for i in sorted(old)])
    assert rep["metric"] == "rouge1"
    assert rep["acc_old"] == pytest.approx(np.mean(list(old.values())))
    assert rep["nfr"] == pytest.approx(np.mean(d < 0))
    assert rep["pfr"] == pytest.approx(np.mean(d > 0))
    # exact_match is read from the log's own field
    rc, _out, err = _run(
        [
            "flips",
            "--old",
            str(L["old"]["gen"]),
            "--new",
            str(L["new"]["gen"]),
            "--json",
            str(out_json),
        ],
        capsys,
    )
    rep = json.loads(out_json.read_text())
    assert rc == 0 and rep["metric"] == "exact_match"
    assert rep["acc_new"] == pytest.approx(
        np.mean([r["exact_match"] for r in _load(L["new"]["gen"])])
    )


def test_lm_eval_several_filters_need_choice(lm_eval_logs, tmp_path, capsys):
    rows = _load(lm_eval_logs["old"]["gen"])
    two = rows + [dict(r, filter="strict-match", exact_match=1.0) for r in rows]
    p = _write_jsonl(tmp_path / "two_filters.jsonl", two)
    with pytest.raises(F.FlipsInputError, match=r"several lm-eval filters.*--filter"):
        F.read_eval_log(p)
    log = F.read_eval_log(p, filter="strict-match")
    assert set(log.scores.values()) == {1.0} and len(log.scores) == 12


# ---------------------------------------------------------------- plain JSONL, hand-computed

OLD = [("a", 1, 1), ("b", 2, 2), ("c", 0, 1), ("d", 3, 3), ("e", 1, 0)]  # id, pred, label
NEW = [("a", 1, 1), ("b", 0, 2), ("c", 1, 1), ("d", 2, 3), ("e", 1, 0)]
CMP = [("a", 1, 1), ("b", 2, 2), ("c", 1, 1), ("d", 0, 3), ("e", 2, 0)]


def _pl(tmp_path, name, rows):
    return _write_jsonl(
        tmp_path / f"{name}.jsonl", [{"id": i, "prediction": p, "label": y} for i, p, y in rows]
    )


def test_plain_prediction_label_hand_computed(tmp_path, capsys):
    # old correct: a b d ; new correct: a c ; compat correct: a b c
    # NFR = {b, d} = 2/5, PFR = {c} = 1/5; NFR_mc: new wrong & answer changed = {b, d} (e same)
    # NFR_c = {d} = 1/5 ; dNFR_c = -1/5 ; d%NFR_c = -1/2 ; dacc_c = 3/5 - 2/5
    paths = [_pl(tmp_path, n, r) for n, r in (("old", OLD), ("new", NEW), ("cmp", CMP))]
    out_json = tmp_path / "r.json"
    rc, out, err = _run(
        [
            "flips",
            "--old",
            str(paths[0]),
            "--new",
            str(paths[1]),
            "--compat",
            str(paths[2]),
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert rc == 0, err
    rep = json.loads(out_json.read_text())
    assert rep["acc_old"] == pytest.approx(0.6) and rep["acc_new"] == pytest.approx(0.4)
    assert rep["acc_c"] == pytest.approx(0.6)
    assert rep["nfr"] == pytest.approx(0.4) and rep["pfr"] == pytest.approx(0.2)
    assert rep["nfr_mc"] == pytest.approx(0.4)
    assert rep["nfr_mc_c"] == pytest.approx(0.4)  # d, e wrong with changed answers
    assert rep["nfr_c"] == pytest.approx(0.2)
    assert rep["dnfr_c"] == pytest.approx(-0.2)
    assert rep["dpct_nfr_c"] == pytest.approx(-0.5)
    assert rep["dacc_c"] == pytest.approx(0.2)
    assert rep["m_g"] == 1.0 and rep["m_r"] == 1.0
    assert rep["counts"] == {  # a ; b ; d ; c ; e
        "old correct, new correct, compat correct": 1,
        "old correct, new correct, compat wrong": 0,
        "old correct, new wrong, compat correct": 1,
        "old correct, new wrong, compat wrong": 1,
        "old wrong, new correct, compat correct": 1,
        "old wrong, new correct, compat wrong": 0,
        "old wrong, new wrong, compat correct": 0,
        "old wrong, new wrong, compat wrong": 1,
    }
    assert "-50.00" in out and "40.00" in out


def test_plain_score_only_generative(tmp_path, capsys):
    old = _write_jsonl(
        tmp_path / "o.jsonl", [{"id": i, "score": s} for i, s in enumerate([0.5, 0.2, 1.0, 0.0])]
    )
    new = _write_jsonl(
        tmp_path / "n.jsonl", [{"id": i, "score": s} for i, s in enumerate([0.75, 0.2, 0.4, 0.0])]
    )
    out_json, png = tmp_path / "g.json", tmp_path / "g.png"
    rc, out, err = _run(
        [
            "flips",
            "--old",
            str(old),
            "--new",
            str(new),
            "--json",
            str(out_json),
            "--plot",
            str(png),
        ],
        capsys,
    )
    assert rc == 0, err
    rep = json.loads(out_json.read_text())
    assert rep["kind"] == "generative" and rep["metric"] == "score"
    assert rep["pfr"] == pytest.approx(0.25) and rep["nfr"] == pytest.approx(0.25)
    assert rep["m_g"] == pytest.approx(0.25) and rep["m_r"] == pytest.approx(0.6)
    assert rep["nfr_mc"] is None
    assert "NFR_mc n/a" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_only_binary_says_nfr_mc_unavailable(tmp_path, capsys):
    old = _write_jsonl(tmp_path / "o.jsonl", [{"id": i, "score": s} for i, s in enumerate([1, 0])])
    new = _write_jsonl(tmp_path / "n.jsonl", [{"id": i, "score": s} for i, s in enumerate([0, 0])])
    rc, out, _err = _run(["flips", "--old", str(old), "--new", str(new)], capsys)
    assert rc == 0
    assert "NFR_mc n/a: OLD: score-only file" in out.replace("\n", " ")


def test_rouge1_and_exact_match_from_predictions(tmp_path):
    rows_o = [
        {"id": 1, "prediction": "the cat sat", "label": "the cat sat on the mat"},
        {"id": 2, "prediction": " Paris ", "label": "Paris"},
    ]
    rows_n = [
        {"id": 1, "prediction": "the cat sat on the mat", "label": "the cat sat on the mat"},
        {"id": 2, "prediction": "London", "label": "Paris"},
    ]
    po, _pn = _write_jsonl(tmp_path / "o.jsonl", rows_o), _write_jsonl(tmp_path / "n.jsonl", rows_n)
    o = F.read_eval_log(po, metric="rouge1")
    # rouge1 of "the cat sat" vs "the cat sat on the mat": P = 1, R = 3/6 (two 'the' in ref,
    # one matched), F = 2/3
    assert o.scores[1] == pytest.approx(2 / 3)
    assert o.scores[2] == pytest.approx(1.0)
    em = F.read_eval_log(po, metric="exact_match")
    assert em.scores == {1: 0.0, 2: 1.0}
    assert F.read_eval_log(po, metric="acc").scores == {1: 0.0, 2: 0.0}


def test_missing_ids_error_and_intersect(tmp_path, capsys):
    old = _write_jsonl(tmp_path / "o.jsonl", [{"id": i, "score": 1} for i in range(10)])
    new = _write_jsonl(tmp_path / "n.jsonl", [{"id": i, "score": 0} for i in range(3, 12)])
    rc, out, err = _run(["flips", "--old", str(old), "--new", str(new)], capsys)
    assert rc == 2 and out == ""  # nothing reported on failure
    assert "3 instance(s) of OLD" in err and "0, 1, 2" in err
    assert "2 instance(s) of NEW" in err and "10, 11" in err
    assert "--intersect" in err
    out_json = tmp_path / "i.json"
    rc, _out, err = _run(
        ["flips", "--old", str(old), "--new", str(new), "--intersect", "--json", str(out_json)],
        capsys,
    )
    assert rc == 0
    assert "dropped 5 instance(s)" in err and "comparing 7" in err
    rep = json.loads(out_json.read_text())
    assert rep["n"] == 7 and rep["n_dropped"] == 5 and rep["nfr"] == 1.0


def test_many_missing_ids_named_but_bounded(tmp_path):
    old = _write_jsonl(tmp_path / "o.jsonl", [{"id": i, "score": 1} for i in range(50)])
    new = _write_jsonl(tmp_path / "n.jsonl", [{"id": 0, "score": 1}])
    logs = {"old": F.read_eval_log(old), "new": F.read_eval_log(new)}
    with pytest.raises(F.FlipsInputError) as e:
        F.align_logs(logs)
    assert "49 instance(s) of OLD" in str(e.value) and "1, 2, 3, 4, 5, ..." in str(e.value)


@pytest.mark.parametrize(
    "lines, message",
    [
        pytest.param(
            ['{"id": 1, "score": 1}', '{"id": 2, "score": 1'],
            r"bad\.jsonl:2: not valid JSON",
            id="truncated-json",
        ),
        pytest.param(
            ['{"id": 1, "score": 1}', "", "[1, 2]"],
            r"bad\.jsonl:3: expected a JSON object",
            id="not-object",
        ),
        pytest.param(
            ['{"id": 1, "score": 1}', '{"score": 1}'],
            r"bad\.jsonl:2: missing 'id'",
            id="missing-id",
        ),
        pytest.param(
            ['{"id": 1, "score": 1}', '{"id": 1, "score": 0}'],
            r"bad\.jsonl:2: id 1 repeats line 1",
            id="duplicate",
        ),
        pytest.param(
            ['{"id": 1, "score": "high"}'],
            r"bad\.jsonl:1: 'score' must be a finite number",
            id="non-numeric",
        ),
        pytest.param(
            ['{"id": 1, "score": NaN}'], r"bad\.jsonl:1: 'score' must be a finite number", id="nan"
        ),
        pytest.param(
            ['{"id": [1], "score": 1}'],
            r"bad\.jsonl:1: 'id' must be an integer or a string",
            id="list-id",
        ),
        pytest.param(['{"name": 1}'], r"bad\.jsonl:1: a record needs 'doc_id'", id="no-id-key"),
        pytest.param([""], r"bad\.jsonl: no records", id="empty"),
        pytest.param(
            ['{"id": 1, "pred": 1}'],
            r"bad\.jsonl:1: no field 'acc', and no 'prediction' and 'label'",
            id="no-score",
        ),
        pytest.param(
            [
                '{"doc_id": 0, "filter": "none", "metrics": ["acc"], "acc": 1}',
                '{"doc_id": 1, "filter": "none", "metrics": ["acc"]}',
            ],
            r"bad\.jsonl:2: no field 'acc' in this sample",
            id="lm-eval-missing-metric",
        ),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, capsys, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    good = _write_jsonl(tmp_path / "good.jsonl", [{"id": 1, "score": 1}])
    rc, _out, err = _run(["flips", "--old", str(good), "--new", str(bad)], capsys)
    assert rc == 2
    import re

    assert re.search(message, err), err


def test_metrics_inferred_differently_is_an_error(tmp_path):
    old = _write_jsonl(tmp_path / "o.jsonl", [{"id": 1, "score": 1}])
    new = _write_jsonl(tmp_path / "n.jsonl", [{"id": 1, "prediction": 1, "label": 1}])
    logs = {"old": F.read_eval_log(old), "new": F.read_eval_log(new)}
    with pytest.raises(F.FlipsInputError, match=r"OLD is scored by 'score' and NEW by 'acc'"):
        F.align_logs(logs)


def test_zero_nfr_relative_delta_is_defined(tmp_path, capsys):
    old = _write_jsonl(tmp_path / "o.jsonl", [{"id": i, "score": 1} for i in range(4)])
    new = _write_jsonl(tmp_path / "n.jsonl", [{"id": i, "score": 1} for i in range(4)])
    cmp_ = _write_jsonl(tmp_path / "c.jsonl", [{"id": i, "score": int(i > 0)} for i in range(4)])
    out_json = tmp_path / "z.json"
    rc, out, _err = _run(
        [
            "flips",
            "--old",
            str(old),
            "--new",
            str(new),
            "--compat",
            str(cmp_),
            "--json",
            str(out_json),
        ],
        capsys,
    )
    assert rc == 0
    rep = json.loads(out_json.read_text())
    assert rep["nfr"] == 0.0 and rep["nfr_c"] == 0.25 and rep["dpct_nfr_c"] == "inf"
    assert "+inf" in out and "NFR = 0" in out.replace("\n", " ")


def test_plot_png_discriminative(tmp_path, capsys):
    paths = [_pl(tmp_path, n, r) for n, r in (("old", OLD), ("new", NEW), ("cmp", CMP))]
    png = tmp_path / "flips.png"
    rc, _out, err = _run(
        [
            "flips",
            "--old",
            str(paths[0]),
            "--new",
            str(paths[1]),
            "--compat",
            str(paths[2]),
            "--plot",
            str(png),
        ],
        capsys,
    )
    assert rc == 0, err
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 800  # two readable panels
    assert img.std() > 0.05  # not a blank canvas


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing-dir", "is-a-dir"])
def test_unwritable_output_is_a_one_line_error(tmp_path, capsys, option, where):
    """An output path that cannot be written: one line naming the option, exit 2, before any work
    (issue 23 item 6), as the input errors are."""
    old = _write_jsonl(tmp_path / "o.jsonl", [{"id": i, "score": s} for i, s in enumerate([1, 0, 1])])
    new = _write_jsonl(tmp_path / "n.jsonl", [{"id": i, "score": s} for i, s in enumerate([0, 0, 1])])
    name = "x.json" if option == "--json" else "x.png"
    target = tmp_path / "missing" / name if where == "missing-dir" else tmp_path
    rc, out, err = _run(["flips", "--old", str(old), "--new", str(new), option, str(target)],
                        capsys)
    assert rc == 2 and out == ""
    assert err.startswith("muscle-fast flips: error: ") and err.count("\n") == 1, err
    assert option in err and str(target) in err


def test_json_without_compat_counts_are_labelled(tmp_path, capsys):
    old = _write_jsonl(tmp_path / "o.jsonl", [{"id": i, "score": s} for i, s in enumerate([1, 0, 1])])
    new = _write_jsonl(tmp_path / "n.jsonl", [{"id": i, "score": s} for i, s in enumerate([0, 0, 1])])
    out_json = tmp_path / "r.json"
    rc, _out, err = _run(["flips", "--old", str(old), "--new", str(new), "--json", str(out_json)],
                         capsys)
    assert rc == 0, err
    assert json.loads(out_json.read_text())["counts"] == {
        "old correct, new correct": 1, "old correct, new wrong": 1,
        "old wrong, new correct": 0, "old wrong, new wrong": 1}


def test_help_explains_inputs_and_metrics(capsys):
    with pytest.raises(SystemExit) as e:
        main(["flips", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in (
        "doc_id",
        "--log_samples",
        "prediction",
        "NFR_mc",
        "d%NFR_c",
        "--intersect",
        "m_g",
        "rouge1",
    ):
        assert word in text, word
    with pytest.raises(SystemExit):
        main([])  # a subcommand is required
