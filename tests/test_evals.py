"""Evaluation: text metrics against hand computations, the multiple-choice harness against
a plain forward pass, calibration metrics, choice-file errors, evaluation by generation,
and the `jaxcai-eval` entry point."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcai.config import compose, model_config
from jaxcai.data.builders import bundled_path
from jaxcai.data.records import read_records
from jaxcai.evals import choice as C
from jaxcai.evals.generation import evaluate_generation, sampling_prompt
from jaxcai.evals.text import bleu, exact_match, rouge_l, text_metrics, token_f1
from jaxcai.model import forward, init_params
from jaxcai.sample import generate
from jaxcai.tokenizer import load as load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SMOKE = "bundled:choice_smoke.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def lively():
    """The tiny random model with its weights scaled up, so it prefers some tokens
    clearly (with the small init every option gets nearly the same probability)."""
    config = model_config(compose(["model=tiny"]).model)
    params = init_params(config, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if "scale" in jax.tree_util.keystr(path) else x * 10.0, params
    )
    return config, params


# ----- text metrics -------------------------------------------------------------------


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def _rouge_l_by_hand(prediction: str, reference: str) -> float:
    p, r = (re.findall(r"[a-z0-9]+", s.lower()) for s in (prediction, reference))
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_is_the_lcs_f_measure():
    pairs = [
        ("the cat sat on the mat", "a cat was sitting on the mat"),
        ("Police killed the gunman.", "The gunman was shot down by police!"),
        ("one two three four", "four three two one"),
    ]
    expected = [_rouge_l_by_hand(p, r) for p, r in pairs]
    assert expected[0] == pytest.approx(2 * (4 / 6) * (4 / 7) / (4 / 6 + 4 / 7))  # sanity
    preds, refs = zip(*pairs, strict=True)
    assert rouge_l(preds, refs) == pytest.approx(np.mean(expected), abs=1e-12)
    # Several references: the best one counts.
    assert rouge_l(["one two three four"], [["four three", "one two three"]]) == pytest.approx(
        _rouge_l_by_hand("one two three four", "one two three")
    )
    assert rouge_l(["spam"], ["eggs"]) == 0.0


def test_exact_match_and_token_f1_by_hand():
    # Normalisation drops case, punctuation, articles and extra whitespace.
    assert exact_match(["The  Eiffel Tower!"], ["eiffel tower"]) == 1.0
    assert exact_match(["Eiffel"], ["eiffel tower"]) == 0.0
    assert exact_match(["an apple", "Paris"], [["a pear", "Apple."], "London"]) == 0.5
    # "the cat sat" vs "cat sat down": tokens [cat, sat] vs [cat, sat, down]:
    # precision 1, recall 2/3, F1 0.8; "x y y" vs "y y y z": common 2 -> P 2/3, R 2/4.
    f1_b = 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    assert token_f1(["the cat sat", "x y y"], ["cat sat down", "y y y z"]) == pytest.approx(
        (0.8 + f1_b) / 2
    )
    # Multi-reference: the best reference per example.
    assert token_f1(["red blue"], [["green", "blue red"]]) == 1.0
    assert token_f1(["nothing shared"], ["all different"]) == 0.0


def test_bleu_identical_disjoint_and_multi_reference():
    text = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"]
    assert bleu(text, text) == pytest.approx(100.0)
    assert bleu(["alpha beta gamma delta epsilon"], ["one two three four five"]) == 0.0
    # The matching reference sits in the second slot of the first example only.
    refs = [["something else entirely here", text[0]], text[1]]
    assert bleu(text, refs) == pytest.approx(100.0)
    assert bleu(text, [["unrelated words all of them"], text[1]]) < 100.0


def test_text_metrics_keys_and_length_mismatch():
    m = text_metrics(["a b c d e"], ["a b c d e"])
    assert m == pytest.approx({"exact_match": 1.0, "token_f1": 1.0, "rougeL": 1.0, "bleu": 100.0})
    for fn in (exact_match, token_f1, rouge_l, bleu, text_metrics):
        with pytest.raises(ValueError, match="3 predictions but 2 references"):
            fn(["a", "b", "c"], ["a", "b"])


# ----- calibration (pure) -------------------------------------------------------------

PROBS = [[0.7, 0.2, 0.1], [0.25, 0.75], [0.55, 0.45], [0.05, 0.15, 0.8], [0.5, 0.5]]
CORRECT = [[0], [0], [1], [0, 2], [0]]


def test_calibration_by_hand():
    m = C.calibration(PROBS, CORRECT)
    # Right, wrong, wrong, right (index 2 is one of two correct), a tie: wrong.
    assert m.correct == (True, False, False, True, False)
    assert m.predicted == (0, 1, 0, 2, 1)
    assert m.accuracy == pytest.approx(2 / 5)
    assert m.p_correct == pytest.approx((0.7 + 0.25 + 0.45 + 0.85 + 0.5) / 5)
    # Brier: sum_k (p_k - y_k)^2, y = 1/2 on each of two correct options.
    brier = [0.09 + 0.04 + 0.01, 2 * 0.75**2, 2 * 0.55**2, 0.45**2 + 0.15**2 + 0.3**2, 0.5]
    assert m.brier == pytest.approx(np.mean(brier))
    # Confidences .7 .75 .55 .8 .5 -> bins 7, 7, 5, 8, 5.
    counts = {b: x.count for b, x in enumerate(m.bins) if x.count}
    assert counts == {5: 2, 7: 2, 8: 1}
    assert m.bins[5].confidence == pytest.approx(0.525) and m.bins[5].accuracy == 0.0
    assert m.bins[7].confidence == pytest.approx(0.725) and m.bins[7].accuracy == 0.5
    assert m.bins[8].accuracy == 1.0
    assert m.ece == pytest.approx(2 / 5 * 0.525 + 2 / 5 * 0.225 + 1 / 5 * 0.2)
    assert np.isnan(m.bins[0].confidence)
    assert C.calibration([[0.0, 1.0]], [[1]]).bins[-1].count == 1  # 1.0 is in the last bin


def test_calibration_rejects_bad_correct_sets():
    with pytest.raises(ValueError, match="proper subset"):
        C.calibration([[0.5, 0.5]], [[0, 1]])
    with pytest.raises(ValueError, match="proper subset"):
        C.calibration([[0.5, 0.5]], [[]])
    with pytest.raises(ValueError, match="2 distributions but 1"):
        C.calibration([[0.5, 0.5]] * 2, [[0]])


# ----- choice files -------------------------------------------------------------------

GOOD = {"prompt": "Q: sky colour?\nA:", "correct": " blue", "incorrect": [" green"]}
BAD_LINES = {
    '{"prompt": "x", "correct": " a", ': "invalid JSON",
    json.dumps({"prompt": "x", "incorrect": [" b"]}): "missing field 'correct'",
    json.dumps({"prompt": "x", "correct": " a", "incorrect": []}): "'incorrect' has no options",
    json.dumps({"prompt": "x", "correct": " a", "incorrect": [" b", 3]}): "not a string",
    json.dumps({"prompt": "  ", "correct": " a", "incorrect": [" b"]}): "'prompt' is empty",
    json.dumps({"prompt": "x", "correct": [" a"], "incorrect": [" a"]}): "appears twice",
}
REASONS = {
    "malformed": 1,
    "missing_field": 1,
    "no_incorrect": 1,
    "not_text": 1,
    "empty_field": 1,
    "duplicate_option": 1,
}


@pytest.mark.parametrize("line,why", list(BAD_LINES.items()))
def test_bad_choice_lines_name_file_and_line(tmp_path, line, why):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(C.ChoiceDataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(why)):
        C.read_choice_file(path)


def test_bad_choice_lines_are_counted_when_skipping(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), *BAD_LINES, json.dumps(GOOD | {"id": 7})]))
    skipped = collections.Counter()
    items = C.read_choice_file(path, skipped)
    assert dict(skipped) == REASONS
    assert [it.id for it in items] == [f"{path}:1", "7"]
    assert items[0].options == (" blue", " green") and items[0].correct == (" blue",)


def test_bundled_choice_file_reads_cleanly():
    [path] = C.choice_files(SMOKE)
    assert path == bundled_path("sft.jsonl").with_name("choice_smoke.jsonl")
    items = C.read_choice_file(path)
    assert len(items) == 20 and len({it.id for it in items}) == 20
    assert all(
        o.startswith(" ") and not it.prompt.endswith(" ") for it in items for o in it.options
    )
    with pytest.raises(C.ChoiceDataError, match="no such bundled file"):
        C.choice_files("bundled:nope.jsonl")


# ----- the choice harness against a plain forward pass --------------------------------


def _option_logps_by_forward(config, params, tok, items) -> list[list[tuple[float, int]]]:
    """(summed log-prob, token count) of every option, from one full forward pass over
    each `bos + prompt + option` text (right-padded in one batch: causal attention
    leaves the real tokens alone)."""
    rows, spans = [], []
    for item in items:
        n_prompt = len(tok.encode(item.prompt, add_bos=True))
        for option in item.options:
            ids = tok.encode(item.prompt + option, add_bos=True)
            assert ids[:n_prompt] == tok.encode(item.prompt, add_bos=True)  # no merge
            rows.append(ids)
            spans.append(n_prompt)
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, : len(ids)] = ids
    logits = np.asarray(jax.jit(forward, static_argnums=0)(config, params, tokens))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float64), axis=-1))
    flat = [
        (sum(logp[r, t - 1, ids[t]] for t in range(n, len(ids))), len(ids) - n)
        for r, (ids, n) in enumerate(zip(rows, spans, strict=True))
    ]
    out, k = [], 0
    for item in items:
        out.append(flat[k : k + len(item.options)])
        k += len(item.options)
    return out


@pytest.fixture(scope="module")
def choice_case(lively, tok):
    config, params = lively
    items = C.read_choice_file(C.choice_files(SMOKE)[0])
    items = [items[0], items[13], items[15], items[18]]  # 2, 4, 5 and 4 options
    return items, _option_logps_by_forward(config, params, tok, items)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_choice_probabilities_match_a_forward_pass(lively, tok, choice_case, normalize):
    config, params = lively
    items, option_logps = choice_case
    report = C.evaluate_choices(config, params, tok, items, batch_size=4, normalize=normalize)
    expected = []
    for per_option in option_logps:
        scores = np.asarray([lp / (n if normalize == "mean" else 1) for lp, n in per_option])
        e = np.exp(scores - scores.max())
        expected.append(e / e.sum())
    for got, want in zip(report.items, expected, strict=True):
        np.testing.assert_allclose(got.probs, want, atol=1e-4)
    assert max(max(p) for p in expected) > 0.6  # the check is not between uniform guesses
    again = C.calibration(expected, [range(len(it.correct)) for it in items])
    assert report.accuracy == again.accuracy
    assert report.brier == pytest.approx(again.brier, abs=1e-4)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["n"] == 4 and len(d["items"]) == 4 and len(d["bins"]) == 10
    assert d["items"][0]["id"] == items[0].id
    assert "| accuracy |" in report.markdown()


def test_option_tokens_merged_at_the_join_count_as_the_option(tok):
    item = C.ChoiceItem("It is t", ("he answer",), ("ea time",), "x")
    prompts, options, cut = C.encode_options(tok, item, 256)
    assert not cut
    for p, o, text in zip(prompts, options, item.options, strict=True):
        assert p + o == tok.encode(item.prompt + text, add_bos=True)
        assert len(p) < len(tok.encode(item.prompt, add_bos=True))  # "t" moved to the option


def test_long_prompts_keep_bos_and_their_end(tok):
    item = C.ChoiceItem("word " * 40 + "end:", (" yes",), (" no way",), "x")
    prompts, options, cut = C.encode_options(tok, item, 16)
    assert cut
    full = tok.encode(item.prompt, add_bos=True)
    for p, o in zip(prompts, options, strict=True):
        assert p[0] == tok.bos_id and full[-(len(p) - 1) :] == p[1:]
        assert len(p) + len(o) - 1 <= 16
    assert len({len(p) for p in prompts}) == 1


# ----- evaluation by generation -------------------------------------------------------


def test_generation_predictions_are_greedy_samples(lively, tok):
    config, params = lively
    records = list(read_records(str(bundled_path("sft.jsonl")), "sft", "jsonl"))[:3]
    out = evaluate_generation(config, params, tok, records, max_new_tokens=8, batch_size=4)
    ids = [tok.encode(r["prompt"].rstrip() + "\n\nAssistant:", add_bos=True) for r in records]
    ref = generate(
        config,
        params,
        ids,
        max_new_tokens=8,
        temperature=0.0,
        stop_ids=(tok.eos_id,),
        stop_strings=("\n\nHuman:",),
        tokenizer=tok,
        pad_id=tok.pad_id,
    )
    predictions = [e["prediction"] for e in out["examples"]]
    assert predictions == [t.strip() for t in ref.texts]
    assert sampling_prompt(records[0]["prompt"]).endswith("?\n\nAssistant:")
    assert out["n"] == 3 and out["examples"][0]["reference"] == records[0]["response"]
    # A record whose reference is the prediction scores exact match 1; the others 0.
    assert any(re.search(r"[a-z]", p) for p in predictions)
    hit = [dict(records[0], response=predictions[0])] + records[1:]
    again = evaluate_generation(config, params, tok, hit, max_new_tokens=8, batch_size=4)
    assert again["metrics"]["exact_match"] == pytest.approx(1 / 3)
    assert again["metrics"]["token_f1"] >= 1 / 3


# ----- the entry point ----------------------------------------------------------------


def _run_eval(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HYDRA_FULL_ERROR="1")
    return subprocess.run(
        [sys.executable, "-m", "jaxcai.main.evaluate", *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_eval_entry_point_choice(tmp_path):
    path = bundled_path("sft.jsonl").with_name("choice_smoke.jsonl")
    result = _run_eval(tmp_path, "task=choice", f"dataset={path}", "progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| accuracy |" in result.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["task"] == "choice" and report["n"] == 20 and len(report["items"]) == 20
    assert 0 <= report["accuracy"] <= 1 and 0 <= report["ece"] <= 1


def test_eval_entry_point_generation(tmp_path):
    out = tmp_path / "out" / "gen.json"
    result = _run_eval(
        tmp_path,
        "task=generation",
        "dataset=bundled:sft.jsonl",
        "limit=4",
        "max_new_tokens=8",
        f"output={out}",
        "progress=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| rougeL |" in result.stdout
    report = json.loads(out.read_text())
    assert report["n"] == 4 and len(report["examples"]) == 4
    assert set(report["metrics"]) == {"exact_match", "token_f1", "rougeL", "bleu"}


@pytest.mark.parametrize(
    "override,message",
    [
        ("normalize=max", "config normalize='max': choose one of ('sum', 'mean')"),
        ("task=qa", "config task='qa': choose one of ('choice', 'generation')"),
        ("limit=-1", "config limit=-1: must be an integer >= 0"),
        ("batch_size=0", "config batch_size=0: must be an integer >= 1"),
    ],
)
def test_eval_config_errors_name_the_key(override, message):
    from jaxcai.config import ConfigError
    from jaxcai.main.evaluate import check_config

    check_config(compose([], "eval"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose([override], "eval"))


def test_sft_training_evaluates_by_generation(tmp_path):
    """`trainer.generate_eval=N` scores the trained model's greedy answers to N eval
    prompts; the logged numbers equal `evaluate_generation` on the saved checkpoint."""
    from jaxcai.config import ConfigError
    from jaxcai.data.builders import decode_record
    from jaxcai.data.training import training_data
    from jaxcai.load import load_model
    from jaxcai.loop import run
    from jaxcai.metrics import read_metrics

    overrides = [
        "experiment=smoke_sft",
        "trainer.steps=3",
        "trainer.progress=false",
        "trainer.tensorboard=false",
        "trainer.generate_eval=4",
        "trainer.generate_max_new_tokens=6",
    ]
    run(compose(overrides), tmp_path)
    logged = read_metrics(tmp_path)[-1]
    cfg = compose(overrides)
    tok = load_tokenizer()
    data = training_data(cfg.data, "sft", tok, cfg.trainer.seed)
    records = [decode_record(data.eval[i]) for i in range(4)]
    config, params = load_model(tmp_path)
    expected = evaluate_generation(config, params, tok, records, max_new_tokens=6)
    for key, value in expected["metrics"].items():
        assert logged[f"eval/gen_{key}"] == pytest.approx(value, abs=1e-6)
    answers = [json.loads(line) for line in (tmp_path / "generation_eval.jsonl").open()]
    assert [a["prediction"] for a in answers] == [e["prediction"] for e in expected["examples"]]
    with pytest.raises(ConfigError, match="trainer.generate_eval"):
        run(compose(["experiment=smoke_dpo", "trainer.generate_eval=2"]), tmp_path / "dpo")
