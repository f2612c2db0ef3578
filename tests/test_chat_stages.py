"""The CAI stages, the eval harnesses and `jaxcai-sample` in a checkpoint's chat format:
with a ChatML template (the Qwen2-shaped fixture of `tests/hf_fixtures.py`) every
conversation goes through the template (few-shot turns as earlier user/assistant turns,
the generation prompt last, the end-of-turn token as a stop id, no "\\n\\nHuman:" stop
string), and with the Human/Assistant format a model gets exactly the ids a bare
`Tokenizer` gives it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from hf_fixtures import REPO, qwen2_dir, tiny_model_dir

from jaxcai import chat, model
from jaxcai.cai import critique as C
from jaxcai.cai import feedback as F
from jaxcai.cai.constitution import ANSWER_SUFFIX, parse_constitution
from jaxcai.chat import HumanAssistantFormat, messages_from_transcript
from jaxcai.evals import choice, generation
from jaxcai.model_config import ModelConfig
from jaxcai.sample import Generation, choose
from jaxcai.sample import chat as SC  # every stage samples through generate_chat
from jaxcai.tokenizer import load as load_tokenizer

LITERAL = """
name: literal
critiques:
  - {name: only, critique: "  Point out harm. ", revision: "Rewrite it safely."}
preferences:
  - {name: p, question: "Which is safer?"}
feedback_template: "{conversation}|{principle}|(A) {response_a}|(B) {response_b}|The answer is:"
critique_examples:
  - prompt: "Can I borrow it?"
    response: "Take it."
    critique_request: "Point out harm."
    critique: "It is fine."
    revision_request: "Rewrite it safely."
    revision: "Sure, ask first."
feedback_examples:
  - conversation: "Human: hi"
    principle: Which is kinder?
    response_a: Hello!
    response_b: Go away.
    answer: A
    reasoning: "A greets the human."
"""


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return qwen2_dir(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def fmt(qwen_dir):
    f = chat.load(qwen_dir)
    assert f.kind == "template"
    return f


@pytest.fixture(scope="module")
def tiny(fmt):
    config = ModelConfig.tiny(vocab_size=fmt.tokenizer.vocab_size)
    return config, model.init_params(config, jax.random.key(0))


@pytest.fixture(scope="module")
def constitution():
    return parse_constitution(LITERAL, "literal.yaml")


class Recorder:
    """A stand-in for `jaxcai.sample.generate`: records each call, answers canned texts."""

    def __init__(self):
        self.calls = []

    def __call__(self, config, params, ids, **kwargs):
        self.calls.append({"ids": [list(i) for i in ids], **kwargs})
        n = len(ids) * kwargs.get("num_samples", 1)
        texts = [f" out{len(self.calls)}-{i} " for i in range(n)]
        return Generation([[5]] * n, [[-1.0]] * n, ["stop_id"] * n, texts)


def _check_template_stops(fmt, call):
    im_end = fmt.tokenizer.token_to_id("<|im_end|>")
    assert im_end in call["stop_ids"] and tuple(call["stop_ids"]) == fmt.stop_ids
    assert "\n\nHuman:" not in call["stop_strings"]
    assert call["tokenizer"] is fmt.tokenizer and call["pad_id"] == fmt.tokenizer.pad_id


# ----- critique -> revision -----------------------------------------------------------


def test_critique_contexts_are_template_conversations(monkeypatch, fmt, tiny, constitution):
    config, params = tiny
    config = config.replace(max_seq_len=2048)
    rec = Recorder()
    monkeypatch.setattr(SC, "generate", rec)
    prompts = ["\n\nHuman: Where is it?", "\n\nSystem: Be brief.\n\nHuman: hi"]
    (first, second) = C.critique_and_revise(
        config, params, fmt, constitution, prompts, rounds=1, few_shot=True
    )
    shots = [
        user("Can I borrow it?"),
        assistant("Take it."),
        user("Point out harm."),
        assistant("It is fine."),
        user("Rewrite it safely."),
        assistant("Sure, ask first."),
    ]
    assert C.few_shot_messages(constitution) == shots
    base = [
        [*shots, user("Where is it?")],
        [{"role": "system", "content": "Be brief."}, *shots, user("hi")],  # system first
    ]
    expected = [
        base,
        [[*b, assistant(f"out1-{i}"), user("Point out harm.")] for i, b in enumerate(base)],
        [
            [
                *b,
                assistant(f"out1-{i}"),
                user("Point out harm."),
                assistant(f"out2-{i}"),
                user("Rewrite it safely."),
            ]
            for i, b in enumerate(base)
        ],
    ]
    assert len(rec.calls) == 3
    for call, conversations in zip(rec.calls, expected, strict=True):
        _check_template_stops(fmt, call)
        assert call["stop_strings"] == ()
        assert call["ids"] == [fmt.prompt_ids(m) for m in conversations]
    text = fmt.tokenizer.decode(rec.calls[2]["ids"][0])
    assert text == fmt.render(expected[2][0], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text.count("<|im_start|>user\n") == 3 + 1 + 2  # few-shot, prompt, two requests
    assert text.count("<|im_start|>assistant\n") == 3 + 2 + 1  # ... and the opened turn
    assert "<|im_start|>user\nCan I borrow it?<|im_end|>\n<|im_start|>assistant\nTake it." in text
    assert text.endswith("<|im_start|>user\nRewrite it safely.<|im_end|>\n<|im_start|>assistant\n")
    assert "Human:" not in text
    system = fmt.tokenizer.decode(rec.calls[0]["ids"][1])
    assert system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCan I")
    assert (first.initial, first.rounds[0]["critique"], first.final) == (
        "out1-0",
        "out2-0",
        "out3-0",
    )
    assert second.prompt == prompts[1]


def test_critique_samples_for_real_in_the_template(fmt, tiny, constitution):
    config, params = tiny
    settings = C.SamplingSettings(max_new_tokens=4, temperature=1.0)
    (rec,) = C.critique_and_revise(
        config, params, fmt, constitution, ["\n\nHuman: hi"], rounds=1, settings=settings
    )
    assert all(isinstance(t, str) for t in (rec.initial, rec.rounds[0]["critique"], rec.final))


# ----- feedback -----------------------------------------------------------------------


def test_split_question():
    q = "Q?\n(A) x\n(B) y\nThe answer is:"
    assert F.split_question(q) == ("Q?\n(A) x\n(B) y\n", "The answer is:")
    cot = "Q?\n(A) x\n(B) y\nLet's think step by step:"
    assert F.split_question(cot) == ("Q?\n(A) x\n(B) y\n", "Let's think step by step:")
    answered = cot + " because.\nThe answer is:"
    assert F.split_question(answered) == (
        "Q?\n(A) x\n(B) y\n",
        "Let's think step by step: because.\nThe answer is:",
    )
    # A few-shot chain-of-thought block before the question: the last cue is the question's.
    shot = "E?\nLet's think step by step: r.\nThe answer is: (A)\n\n"
    assert F.split_question(shot + answered)[0] == shot + "Q?\n(A) x\n(B) y\n"
    # A cue inside the conversation of a plain question does not make it one.
    quoted = "Let's think step by step: no.\nThe answer is: (B)\nQ?\nThe answer is:"
    assert F.split_question(quoted) == (quoted[: -len(ANSWER_SUFFIX)], ANSWER_SUFFIX)
    assert F.split_question("Why?") == ("Why?", "")
    for text in (q, cot, answered, shot + answered, quoted, "Why?"):
        assert "".join(F.split_question(text)) == text


def test_feedback_question_is_a_user_turn_and_the_options_start_the_answer(fmt, tiny, constitution):
    config, params = tiny
    judge = F.ModelJudge(config, params, fmt, batch_size=2)
    question = F.feedback_question(
        constitution, "\n\nHuman: hi", "hello", "go away", "Which is kinder?", few_shot=False
    )
    context = judge.context(question)
    user_part = question[: -len(ANSWER_SUFFIX)]
    assert context == fmt.render([user(user_part.strip())], True) + ANSWER_SUFFIX
    assert context.endswith(
        "|(A) hello|(B) go away|<|im_end|>\n<|im_start|>assistant\nThe answer is:"
    )
    assert "<|im_start|>user\n\n\nHuman: hi|Which is kinder?|" not in context
    assert "<|im_start|>user\nHuman: hi|Which is kinder?|(A) hello" in context
    ctx_ids = fmt.tokenizer.encode(context)
    options = []
    for option in F.OPTIONS:
        joined = fmt.tokenizer.encode(context + option)
        assert joined[: len(ctx_ids)] == ctx_ids
        options.append(joined[len(ctx_ids) :])
        assert choice.option_ids(fmt, context, option) == (ctx_ids, options[-1])
    questions = [question, question.replace("hello", "hi there")]
    got = judge(questions)
    ids = [fmt.tokenizer.encode(judge.context(q)) for q in questions]
    np.testing.assert_allclose(got, choose(config, params, ids, options), atol=1e-6)
    assert got.shape == (2, 2) and np.allclose(got.sum(axis=1), 1.0)


def test_chain_of_thought_in_the_template(monkeypatch, fmt, tiny, constitution):
    config, params = tiny
    judge = F.ModelJudge(config, params, fmt)
    cot = F.feedback_question(
        constitution, "\n\nHuman: hi", "hello", "go away", "Which is kinder?", cot=True
    )
    context = judge.context(cot)
    assert context.endswith("<|im_start|>assistant\nLet's think step by step:")
    # The few-shot example (its reasoning and answer) stays inside the user's turn.
    assert "A greets the human.\nThe answer is: (A)" in context.split("<|im_start|>user")[1]
    answered = judge.context(f"{cot} It is kinder.\n{ANSWER_SUFFIX}")
    assert answered.endswith(
        "<|im_start|>assistant\nLet's think step by step: It is kinder.\nThe answer is:"
    )
    rec = Recorder()
    monkeypatch.setattr(SC, "generate", rec)
    assert judge.reason([cot], [1], 5) == ["out1-0"]
    (call,) = rec.calls
    _check_template_stops(fmt, call)
    assert call["stop_strings"] == (ANSWER_SUFFIX,)
    assert call["ids"] == [fmt.tokenizer.encode(context)]


def test_sample_pairs_and_generation_eval_open_the_template(monkeypatch, fmt, tiny):
    config, params = tiny
    prompts = ["\n\nHuman: hi", "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?"]
    for _module, run in (
        (F, lambda: F.sample_pairs(config, params, fmt, prompts, max_new_tokens=4)),
        (
            generation,
            lambda: generation.evaluate_generation(
                config,
                params,
                fmt,
                [{"prompt": p, "response": "x"} for p in prompts],
                max_new_tokens=4,
            ),
        ),
    ):
        rec = Recorder()
        monkeypatch.setattr(SC, "generate", rec)
        run()
        (call,) = rec.calls
        _check_template_stops(fmt, call)
        assert call["ids"] == [fmt.prompt_ids(messages_from_transcript(p)) for p in prompts]
        text = fmt.tokenizer.decode(call["ids"][1])
        assert text.endswith(
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
            "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
        )
    monkeypatch.undo()
    pairs = F.sample_pairs(config, params, fmt, prompts, max_new_tokens=4, seed=1)
    assert pairs == F.sample_pairs(config, params, fmt, prompts, max_new_tokens=4, seed=1)


def test_choice_items_in_the_template(fmt, tiny):
    config, params = tiny
    item = choice.ChoiceItem("Is the sky blue?\nThe answer is:", (" yes",), (" no",), "q")
    prompts, options, cut = choice.encode_options(fmt, item, config.max_seq_len)
    assert not cut
    context = fmt.answer_text(item.prompt, "")
    assert context.endswith("The answer is:<|im_end|>\n<|im_start|>assistant\n")
    for p, o, text in zip(prompts, options, ("yes", "no"), strict=True):
        assert p + o == fmt.tokenizer.encode(context + text)  # the answer's first word
        assert fmt.tokenizer.decode(o) == text
    report = choice.evaluate_choices(config, params, fmt, [item, item])
    assert report.n == 2
    # Cut to fit: no BOS in this template, so the prompt keeps just its end.
    prompts, options, cut = choice.encode_options(fmt, item, 12)
    assert cut and all(len(p) + len(o) - 1 <= 12 for p, o in zip(prompts, options, strict=True))
    assert prompts[0] == fmt.tokenizer.encode(context)[-len(prompts[0]) :]


# ----- the Human/Assistant format is the bare tokenizer -------------------------------


def test_human_assistant_format_gives_the_tokenizer_ids(monkeypatch, constitution):
    tok = load_tokenizer()
    ha = HumanAssistantFormat(tok)
    assert chat.as_format(tok).kind == "human_assistant"
    config = ModelConfig.tiny(max_seq_len=1024)
    params = model.init_params(config, jax.random.key(1))
    prompts = ["\n\nHuman: Where is it?", "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?"]

    def calls(module, run, *args):
        rec = Recorder()
        monkeypatch.setattr(SC, "generate", rec)
        out = run(*args)
        monkeypatch.undo()
        return rec.calls, out

    for module, run in (
        (C, lambda t: C.critique_and_revise(config, params, t, constitution, prompts, rounds=1)),
        (F, lambda t: F.sample_pairs(config, params, t, prompts, max_new_tokens=4)),
        (F, lambda t: F.ModelJudge(config, params, t).reason(["Why?", "x\nLet's"], [1, 2], 3)),
        (
            generation,
            lambda t: generation.evaluate_generation(
                config,
                params,
                t,
                [{"prompt": p, "response": "r"} for p in prompts],
                max_new_tokens=4,
            ),
        ),
    ):
        (with_tok, out_tok), (with_ha, out_ha) = calls(module, run, tok), calls(module, run, ha)
        assert [c["ids"] for c in with_tok] == [c["ids"] for c in with_ha]
        assert repr(out_tok) == repr(out_ha)
        for a, b in zip(with_tok, with_ha, strict=True):
            assert tuple(a["stop_ids"]) == tuple(b["stop_ids"]) == (tok.eos_id,)
            assert a["stop_strings"] == b["stop_strings"]
            assert "\n\nHuman:" in a["stop_strings"]
    # The transcript text itself, as the stages wrote it before chat formats.
    (first, *_), _ = calls(
        C, lambda t: C.critique_and_revise(config, params, t, constitution, prompts, rounds=0), ha
    )
    assert first["ids"][0] == tok.encode(
        C.few_shot_prefix(constitution) + prompts[0] + "\n\nAssistant:", add_bos=True
    )
    question = F.feedback_question(constitution, prompts[0], "a", "b", "Which is safer?")
    judges = [F.ModelJudge(config, params, t) for t in (tok, ha)]
    assert judges[1].context(question) == question
    np.testing.assert_array_equal(judges[0]([question]), judges[1]([question]))
    item = choice.ChoiceItem("It is t", ("he answer",), ("ea time",), "x")
    assert choice.encode_options(tok, item, 256) == choice.encode_options(ha, item, 256)
    assert choice.encode_options(tok, item, 16) == choice.encode_options(ha, item, 16)


# ----- entry points -------------------------------------------------------------------


def _fake_run(root: Path, fixture_dir: Path | None, data: str = "{tokenizer: null}") -> Path:
    """A jaxcai run directory (its config.yaml, checkpoints/3 and, as training stores it,
    its tokenizer/ when `fixture_dir` is given)."""
    import shutil

    (root / "checkpoints" / "3").mkdir(parents=True)
    (root / "config.yaml").write_text(f"model: {{}}\ndata: {data}\n")
    if fixture_dir is not None:
        shutil.copytree(fixture_dir, root / "tokenizer")
    return root


def test_chat_for_resolves_the_checkpoint_tokenizer(tmp_path, qwen_dir):
    from jaxcai.main import chat_for

    run = _fake_run(tmp_path / "run", qwen_dir)
    qwen_vocab = load_tokenizer(qwen_dir).vocab_size
    for tokenizer, path in (
        (None, run),
        (None, run / "checkpoints"),
        (None, run / "checkpoints" / "3"),
        (qwen_dir, None),
    ):
        f = chat_for(tokenizer, "auto", path, "prog")
        assert f.kind == "template" and f.tokenizer.vocab_size == qwen_vocab
        assert chat_for(tokenizer, "human_assistant", path).kind == "human_assistant"
    thinking = chat_for(qwen_dir, "auto", None, chat_kwargs={"enable_thinking": False})
    assert thinking.render([user("hi")], True).endswith("<think>\n\n</think>\n\n")
    assert chat_for(None, "auto", None).tokenizer.vocab_size == 1024  # bundled
    # A run that trained with the bundled tokenizer and did not store it; a run whose
    # recorded format is the transcript although its tokenizer has a template.
    assert chat_for(None, "auto", _fake_run(tmp_path / "old", None)).kind == "human_assistant"
    plain = _fake_run(tmp_path / "plain", qwen_dir, "{tokenizer: null, chat: human_assistant}")
    assert chat_for(None, "auto", plain).kind == "human_assistant"
    # An explicit tokenizer= wins over the checkpoint's.
    bundled = chat_for(str(REPO / "jaxcai" / "assets" / "tokenizer.model"), "auto", run)
    assert bundled.kind == "human_assistant" and bundled.tokenizer.vocab_size == 1024
    no_tokenizer = tmp_path / "hf_without_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    for args, message in (
        ((None, "template", None), "prog: .*bundled tokenizer.*chat=template"),
        ((str(tmp_path / "nowhere"), "auto", None), f"prog: .*{tmp_path / 'nowhere'}"),
        ((None, "auto", tmp_path / "nowhere"), f"prog: .*{tmp_path / 'nowhere'}"),
        ((None, "auto", no_tokenizer), f"prog: .*{no_tokenizer}.*no tokenizer"),
        ((None, "chatml", run), "prog: .*chat='chatml'"),
        ((str(qwen_dir / "tokenizer_config.json"), "auto", None), "prog: .*tokenizer_config"),
    ):
        with pytest.raises(SystemExit, match=message):
            chat_for(*args, program="prog")


def _hf_checkpoint(path: Path, vocab_size: int) -> Path:
    """A tiny random Qwen2 model saved by transformers beside the fixture tokenizer."""
    return tiny_model_dir(path, "Qwen2", vocab_size)


def _run(module: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HYDRA_FULL_ERROR="1")
    return subprocess.run(
        [sys.executable, "-m", module, *overrides, f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # a jaxcai-sample subprocess
def test_jaxcai_sample_uses_the_checkpoint_template(tmp_path, fmt):
    hf_dir = qwen2_dir(tmp_path / "qwen")
    _hf_checkpoint(hf_dir, fmt.tokenizer.vocab_size)
    result = _run(
        "jaxcai.main.sample",
        tmp_path,
        f"checkpoint={hf_dir}",  # no tokenizer= and no chat=: the directory's own
        "max_new_tokens=4",
        "num_samples=2",
        "temperature=1.0",
        "progress=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"tokenizer {hf_dir / 'tokenizer.json'}, chat format template" in result.stderr
    opened = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "How do I keep basil alive on a windowsill?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert result.stdout.startswith(opened) and result.stdout.count(opened) == 2
    assert "Human:" not in result.stdout
