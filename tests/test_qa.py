"""Question answering: context input, chunking and BM25 retrieval, the extractive span constraint,
document-cache reuse, SQuAD metrics, the dev set and the CLI (qa, eval-qa)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxllama.cli import cli
from mlxllama.errors import InputError
from mlxllama.models.cache import KVCache
from mlxllama.qa import NO_ANSWER, Document, QASession, answer, read_context
from mlxllama.qa.metrics import exact_match, f1_score, normalize_answer, score_item
from mlxllama.qa.prompt import is_no_answer
from mlxllama.qa.retrieve import rank, split_sections
from tinymodels import write_model

DEV_SET = Path(__file__).resolve().parents[1] / "examples" / "qa_dev.jsonl"
CONTEXT = "We met in the city of Paris, France, on 3 May 1999. 北京是中国的首都。"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(write_model(tmp_path_factory.mktemp("qa_tiny"), "gqa_tied", max_position_embeddings=2048))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from mlxllama import load

    return load(tiny_dir)


def needle_document(n_sentences: int = 120) -> tuple[str, str]:
    filler = [f"Report {i} notes that the {w} committee reviewed routine matters and found nothing unusual."
              for i, w in zip(range(n_sentences), ["budget", "safety", "garden", "library", "transport"] * 99)]
    needle = "The vault access code is 7319 and it was chosen by Priya Raman."
    filler.insert(n_sentences * 2 // 3, needle)
    return " ".join(filler), needle


# -- context input and bad input ---------------------------------------------------------------


def test_read_context_files_folders_and_stdin(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("alpha text")
    (tmp_path / "docs" / "sub" / "b.md").write_text("# beta\nnotes")
    (tmp_path / "docs" / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "one.txt").write_text("one\r\nline")
    docs = read_context([tmp_path / "docs", tmp_path / "one.txt", "-"], stdin=io.StringIO("from stdin"))
    assert [Path(d.source).name for d in docs] == ["a.txt", "b.md", "one.txt", "<stdin>"]
    assert docs[2].text == "one\nline" and docs[3].text == "from stdin"


@pytest.mark.parametrize("setup,message", [
    (lambda p: p / "missing.txt", "context file not found"),
    (lambda p: (p / "bin.txt").write_bytes(b"\x00\x01binary\x00") and p / "bin.txt", "is a binary file"),
    (lambda p: (p / "empty.txt").write_text(" \n\t") and p / "empty.txt", "the context is empty"),
    (lambda p: (p / "nothing").mkdir() or p / "nothing", "no documents in folder"),
])
def test_bad_context_is_an_input_error(tmp_path, setup, message):
    with pytest.raises(InputError, match=message):
        read_context([setup(tmp_path)])


def test_too_large_and_empty_question(tiny):
    from mlxllama.qa.context import check_documents

    with pytest.raises(InputError, match="more than the limit"):
        check_documents([Document("big", "x" * 101)], max_chars=100)
    with pytest.raises(InputError, match="the question is empty"):
        answer(*tiny, "  ", CONTEXT)
    with pytest.raises(InputError, match="the context is empty"):
        answer(*tiny, "Where?", ["", "  "])


# -- chunks and retrieval --------------------------------------------------------------------------


def test_long_paragraphs_are_cut_at_sentence_ends_with_offsets():
    text, _ = needle_document(40)
    chunks = split_sections(Document("doc.txt", text), 400)
    assert len(chunks) > 5
    for a, b in zip(chunks, chunks[1:]):
        assert a.text == text[a.start : a.end] and len(a.text) <= 400
        assert a.end <= b.start and a.text.endswith(".")  # in order, whole sentences
    assert chunks[0].start == 0 and chunks[-1].end == len(text)


def test_retrieval_ranks_the_needle_first(tiny):
    text, needle = needle_document()
    chunks = split_sections(Document("long.txt", text), 500)
    best = rank(chunks, "What is the vault access code?")[0]
    assert needle in best.text and best.score > 0
    # end to end: the document does not fit --max-context, so the prompt holds the best chunks
    session = QASession(*tiny, {"long.txt": text}, max_context=600, max_tokens=4)
    result = session.ask("Who chose the vault access code?")
    first = result.chunks[0]
    assert first["source"] == "long.txt" and needle in text[first["start"] : first["end"]]
    scores = [c["score"] for c in result.chunks]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0  # no irrelevant chunks
    assert first["end"] - first["start"] < len(text) // 4


def test_retrieval_of_chinese_text():
    doc = "。".join(f"第{i}段记录了普通的会议内容" for i in range(60)) + "。金库密码是七三一九。" + "其他内容。" * 40
    chunks = split_sections(Document("zh.txt", doc), 120)
    assert "金库密码" in rank(chunks, "金库密码是什么？")[0].text


def test_context_too_small_for_the_window(tiny):
    with pytest.raises(InputError, match="no room for the documents"):
        answer(*tiny, "word " * 2000, CONTEXT)


# -- the extractive constraint -----------------------------------------------------------------


class ScriptedModel:
    """Wants to write `script` (token ids) after the prompt, then EOS, whatever the context says.
    It satisfies the model contract (logits (B, L, V), a trimmable cache)."""

    def __init__(self, tokenizer, script: list[int], vocab: int = 300):
        self.args = SimpleNamespace(max_position_embeddings=4096)
        self.script, self.vocab = script, vocab
        self.eos = tokenizer.eos_token_id
        self.start = tokenizer.encode("<|im_start|>", add_special_tokens=False)[0]
        self.header = len(tokenizer.encode("assistant\n", add_special_tokens=False))
        self.fed: list[int] = []
        self.eos_logit = 5.0

    def make_cache(self):
        return [KVCache()]

    def _row(self, seq: list[int]) -> list[float]:
        row = [-0.01 * i for i in range(self.vocab)]  # a fixed fallback preference: low ids
        last = max(i for i, t in enumerate(seq) if t == self.start)
        n = len(seq) - (last + 1 + self.header)
        if 0 <= n < len(self.script):
            row[self.script[n]] = 10.0
        row[self.eos] = self.eos_logit
        return row

    def __call__(self, tokens, cache):
        c, L = cache[0], tokens.shape[1]
        del self.fed[c.offset :]
        self.fed += tokens[0].tolist()
        kv = mx.zeros((1, 1, L, 1))
        c.update_and_fetch(kv, kv)
        return mx.array([self._row(self.fed[: c.offset - L + i + 1]) for i in range(L)])[None]


def by_bytes(tokenizer, *pieces: bytes) -> list[int]:
    table = {tokenizer.token_bytes(i): i for i in range(len(tokenizer) - 1, -1, -1)}
    return [table[p] for p in pieces]


def bytes_of(text: str) -> list[bytes]:
    return [bytes([b]) for b in text.encode()]


@pytest.mark.parametrize("pieces,expected", [
    ([b" t", b"he"], "the"),  # the context has " the" as one token: a different tokenization
    ([b"t", b"h", b"e"], "the"),  # without the leading space the context token carries
    ([b"P", b"a", b"r", b"i", b"s", b","], "Paris,"),  # punctuation glued on
    (bytes_of("首都"), "首都"),  # Chinese, three byte tokens per character
    (bytes_of("首")[:1], "首"),  # EOS is refused mid-character: the character is completed
    (bytes_of("1999."), "1999."),
])
def test_extractive_span_with_different_tokenization(tiny, pieces, expected):
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *pieces))
    result = answer(model, tok, "Question?", CONTEXT, extractive=True, no_answer_threshold=-1e9)
    assert result.answer == expected and not result.no_answer
    e = result.evidence
    assert CONTEXT[e["start"] : e["end"]] == expected == e["text"] and e["source"] == "<context>"


@pytest.mark.parametrize("text", ["London", "aris", "中国人民", "Paris, Germany"])
def test_extractive_never_invents_text(tiny, text):
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of(text)))
    result = answer(model, tok, "Question?", CONTEXT, extractive=True, no_answer_threshold=-1e9)
    assert result.answer != text and result.answer in CONTEXT
    if text == "aris":  # no span starts inside a word
        assert not result.answer.startswith("aris")


def test_extractive_span_is_never_the_question_the_documents_quote(tiny):
    _, tok = tiny
    context = 'The form asks "Where is the office?" and the office is in Leeds. Where is the office? In Leeds.'
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("Where is the office?")))
    result = answer(model, tok, "where is  the office?", context, extractive=True, no_answer_threshold=-1e9)
    assert result.answer in context and "where is the office" not in result.answer.lower()
    e = result.evidence
    assert context[e["start"]:e["end"]] == result.answer
    free = answer(model, tok, "Who?", context, extractive=True, no_answer_threshold=-1e9, concise=False)
    assert free.answer == "Where is the office?"  # other questions may still quote it


@pytest.mark.parametrize("seed", range(6))
def test_extractive_answers_are_substrings_with_sampling(tiny, seed):
    contexts = [CONTEXT, "Revenue: $4,260.00 (VAT 20%); due 3 March 2024!", "长城东起山海关，西至嘉峪关。"]
    context = contexts[seed % 3]
    result = answer(*tiny, "What?", context, extractive=True, temp=1.5, seed=seed, max_tokens=12,
                    no_answer_threshold=-1e9)
    assert result.answer and result.answer in context
    assert context[result.evidence["start"] : result.evidence["end"]] == result.answer


def test_no_answer_in_both_modes(tiny):
    _, tok = tiny
    phrase = ScriptedModel(tok, tok.encode(NO_ANSWER, add_special_tokens=False))
    result = answer(phrase, tok, "Question?", CONTEXT)
    assert result.no_answer and result.answer == NO_ANSWER and result.evidence is None
    spanner = ScriptedModel(tok, by_bytes(tok, *bytes_of("Paris")))
    sure = answer(spanner, tok, "Question?", CONTEXT, extractive=True)
    assert not sure.no_answer and sure.answer == "Paris" and sure.margin > 0
    strict = answer(spanner, tok, "Question?", CONTEXT, extractive=True, no_answer_threshold=sure.margin + 1)
    assert strict.no_answer and strict.answer == NO_ANSWER
    assert is_no_answer("The context does not mention the salary.") and not is_no_answer("Paris")


# -- the document cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("extractive", [False, True])
def test_reused_document_cache_gives_the_fresh_answer(tiny, extractive):
    model, tok = tiny
    kwargs = dict(extractive=extractive, max_tokens=8, no_answer_threshold=-1e9)
    session = QASession(model, tok, CONTEXT, **kwargs)
    first = session.ask("Where did we meet?")
    again = session.ask("When did we meet in Paris?")
    fresh = answer(model, tok, "When did we meet in Paris?", CONTEXT, **kwargs)
    assert again.answer == fresh.answer and again.evidence == fresh.evidence
    assert again.score == pytest.approx(fresh.score, rel=1e-4)
    assert first.prompt_tokens > len(session.cached_doc)  # the first question paid for the documents
    assert again.prompt_tokens == fresh.prompt_tokens - len(session.cached_doc)  # only the question's tokens


# -- metrics and the dev set ------------------------------------------------------------------------


def test_squad_metrics():
    assert normalize_answer("The  Black Sea!") == "black sea"
    assert exact_match("the Volga.", "Volga") == 1.0
    assert f1_score("in the Black Forest", "the Black Forest in Germany") == pytest.approx(2 * 0.75 / 1.75)
    assert f1_score("四川和甘肃", "四川、陕西和甘肃") == pytest.approx(2 * 1.0 * (5 / 7) / (1 + 5 / 7))
    assert score_item("anything", True, []) == (1.0, 1.0)
    assert score_item("anything", False, []) == (0.0, 0.0)
    assert score_item(NO_ANSWER, True, ["Paris"]) == (0.0, 0.0)


def test_dev_set_is_well_formed():
    items = [json.loads(line) for line in DEV_SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(items) >= 150 and len({i["id"] for i in items}) == len(items)
    texts = lambda item: list(item["context"].values()) if isinstance(item["context"], dict) else [item["context"]]
    for item in items:
        assert item["question"].strip() and all(t.strip() for t in texts(item))
        assert item["split"] in ("tune", "test"), item["id"]
        assert all(a and any(a in t for t in texts(item)) for a in item["answers"]), item["id"]  # verbatim
    for split in ("tune", "test"):
        part = [i for i in items if i["split"] == split]
        assert len(part) >= 70 and sum(not i["answers"] for i in part) >= 15
    assert sum(not i["answers"] for i in items) >= 30
    assert sum(any("\u4e00" <= ch <= "\u9fff" for t in texts(i) for ch in t) for i in items) >= 20
    assert sum(isinstance(i["context"], dict) for i in items) >= 5  # several files
    assert sum(sum(map(len, texts(i))) > 8000 for i in items) >= 10  # longer than the reading budget


# -- the CLI --------------------------------------------------------------------------------------------


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


@pytest.fixture
def notes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(CONTEXT, encoding="utf-8")
    return str(path)


def test_cli_json_fields(tiny_dir, notes):
    r = run("qa", "--model", tiny_dir, "--context", notes, "Where did we meet?", "--json", "--extractive",
            "--no-answer-threshold", "-1e9", "-n", "6")
    assert r.exit_code == 0, r.output
    record = json.loads(r.output)
    assert {"answer", "no_answer", "evidence", "score", "chunks"} <= set(record)
    e = record["evidence"]
    assert set(e) == {"source", "start", "end", "text"} and e["source"] == notes
    assert CONTEXT[e["start"] : e["end"]] == e["text"] == record["answer"]
    assert record["chunks"] == [{"source": notes, "start": 0, "end": len(CONTEXT), "heading": "", "score": 0.0}]
    assert record["citations"] == [{"n": 1, "source": notes, "start": 0, "end": len(CONTEXT), "heading": ""}]


def test_cli_several_questions_and_stdin(tiny_dir):
    r = run("qa", "--model", tiny_dir, "--context", "-", "--question", "Where?", "--question", "When?", "--json", "-n", "3",
            input=CONTEXT)
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.output.splitlines()]
    assert [x["question"] for x in records] == ["Where?", "When?"]
    assert records[1]["prompt_tokens"] < records[0]["prompt_tokens"] // 4
    r = run("qa", "--model", tiny_dir, "--context", "-", "-i", input="Where?\n")
    assert isinstance(r.exception, InputError) and "not '-'" in str(r.exception)


@pytest.mark.parametrize("args,message", [
    (["--context", "/no/such/notes.txt", "Q?"], "context file not found: /no/such/notes.txt"),
    (["--context", "NOTES", "  "], "the question is empty"),
    (["--context", "NOTES"], "no question given"),
    (["--context", "EMPTY", "Q?"], "the context is empty"),
    (["--context", "BINARY", "Q?"], "is a binary file"),
])
def test_cli_bad_input(tiny_dir, notes, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    swap = {"NOTES": notes, "EMPTY": str(tmp_path / "empty.txt"), "BINARY": str(tmp_path / "data.bin")}
    r = run("qa", "--model", tiny_dir, *[swap.get(a, a) for a in args])
    assert isinstance(r.exception, InputError), r.output
    assert message in str(r.exception)


def test_cli_subprocess_one_line_errors_and_answers(tiny_dir, notes, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "mlxllama", "qa", "--model", tiny_dir, "--context",
                          str(tmp_path / "gone.txt"), "Q?"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip() == f"error: context file not found: {tmp_path / 'gone.txt'}"
    good = subprocess.run([sys.executable, "-m", "mlxllama", "qa", "--model", tiny_dir, "--context", notes,
                           "--extractive", "--no-answer-threshold", "-1e9", "-n", "4", "Where?"],
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() in CONTEXT and "characters" in good.stderr


def test_cli_eval_qa(tiny_dir, tmp_path):
    data = tmp_path / "dev.jsonl"
    rows = [{"id": "a", "context": CONTEXT, "question": "Where?", "answers": ["Paris"]},
            {"id": "b", "context": CONTEXT, "question": "Who?", "answers": []}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("eval-qa", str(data), "--model", tiny_dir, "--extractive", "--json", "-n", "4",
            "--predictions", str(tmp_path / "preds.jsonl"))
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["items"] == 2 and report["mode"] == "extractive"
    assert {"exact_match", "f1", "no_answer_accuracy", "answers_per_second"} <= set(report)
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(preds) == 2  # with what a rule needs to be re-applied offline
    assert {"margin", "coverage", "sentence", "evidence", "chunks"} <= set(preds[0])
    assert preds[0]["chunks"][0]["source"] and "end" in preds[0]["chunks"][0]
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    r = run("eval-qa", str(tmp_path / "broken.jsonl"), "--model", tiny_dir)
    assert isinstance(r.exception, InputError) and "not JSON" in str(r.exception)


# -- the real model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_answers_from_the_context(default_model_dir):
    from mlxllama import load

    model, tok = load(default_model_dir)
    context = ("Harbor Goods was founded in 1987 by Ana Ruiz. The first warehouse opened in Leeds in 1989, "
               "and a second one followed in Bristol in 1994.")
    session = QASession(model, tok, context, extractive=True)
    where = session.ask("Where did the first warehouse open?")
    assert where.answer in context and not where.no_answer  # a span, whatever the model prefers
    who = session.ask("Who founded Harbor Goods?")
    assert who.answer == "Ana Ruiz" and who.evidence["start"] == context.index("Ana Ruiz")
    assert who.prompt_tokens < 20  # the document's cache was reused
    fresh = answer(model, tok, "Who founded Harbor Goods?", context, extractive=True)
    assert fresh.answer == who.answer and fresh.margin == pytest.approx(who.margin, abs=1e-3)
    generated = answer(model, tok, "Who founded Harbor Goods?", context)
    assert "ruiz" in generated.answer.lower() and generated.evidence["text"] == "Ana Ruiz"


@pytest.mark.slow
def test_default_model_says_how_to_serve_the_api_from_the_readme(default_model_dir):
    """The README's own example question: the command from the README's `serve` line, citing it."""
    from mlxllama import load
    from mlxllama.qa.retrieve import heading_at

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    model, tok = load(default_model_dir)
    result = answer(model, tok, "How do I serve the API?", {"README.md": readme})
    assert "mlxllama serve" in result.answer and not result.no_answer
    e = result.evidence
    assert e["source"] == "README.md" and readme[e["start"]:e["end"]] == e["text"] and "mlxllama serve" in e["text"]
    assert [c["heading"] for c in result.citations] == [heading_at(readme, e["start"])]  # the section it is in


@pytest.mark.parametrize("extractive", [False, True], ids=["generative", "extractive"])
def test_prompt_lookup_drafts_from_the_documents(tiny, monkeypatch, extractive):
    """The session's prompt is one token after the cached documents: prompt lookup drafts from the
    documents too, so an answer copied from them comes from accepted drafts; an extractive
    answer's free answer too (its span constraint, when needed, follows one token at a time)."""
    import mlxllama.qa.session as qs

    _, tok = tiny
    drafted = []
    real = qs.stream_generate

    def counting(*args, **kwargs):
        for r in real(*args, **kwargs):
            drafted.append(r.from_draft)
            yield r

    monkeypatch.setattr(qs, "stream_generate", counting)
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("Paris, France")))
    session = QASession(model, tok, CONTEXT, prompt_lookup=4, no_answer_threshold=None, extractive=extractive)
    assert session.ask("Where?").answer == "Paris, France"
    assert sum(drafted) >= 6


@pytest.mark.parametrize("prompt_lookup", [0, 2])
def test_generative_answer_and_evidence(tiny, prompt_lookup):
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("paris, france")))
    pieces = []
    session = QASession(model, tok, CONTEXT, prompt_lookup=prompt_lookup, no_answer_threshold=None)
    result = session.ask("Where?", pieces.append)
    assert result.answer == "paris, france" and "".join(pieces) == "paris, france"  # streamed
    assert result.evidence == {"source": "<context>", "start": 22, "end": 35, "text": "Paris, France"}


# -- the short answer inside a generated sentence ------------------------------------------------

from mlxllama.qa.concise import asks_how, code_spans, command_answer, concise_answer, grounded  # noqa: E402

LOVELACE = ("Ada Lovelace was born on 10 December 1815 in London. Her father was the poet Lord Byron. "
            "With Charles Babbage she worked on the Analytical Engine. Uhuru Peak rises 5,895 metres above sea "
            "level. The office is in Paris, France.")


@pytest.mark.parametrize("sentence, question, short", [
    ("Ada Lovelace was born on 10 December 1815.", "When was Ada Lovelace born?", "10 December 1815"),
    ("Ada Lovelace's father was Lord Byron.", "Who was Ada Lovelace's father?", "Lord Byron"),
    ("Lovelace worked on the Analytical Engine with Charles Babbage.",
     "What machine did Lovelace work on with Charles Babbage?", "Analytical Engine"),
    ("Uhuru Peak is 5,895 metres above sea level, making it the highest mountain in Africa.",
     "How high is Uhuru Peak?", "5,895 metres above sea level"),
    ("The office is in Paris, France.", "Where is the office?", "Paris, France"),
])
def test_concise_answer_keeps_what_the_question_lacks(sentence, question, short):
    assert concise_answer(sentence, question, [LOVELACE]) == short
    assert short in LOVELACE  # always text the documents hold


def test_concise_answer_reads_a_list_item():
    steps = "1. Plug in the router.\n2. Wait until the status light turns solid green."
    assert concise_answer("1. The status light turns solid green.", "What colour does the status light turn?",
                          [steps]) == "solid green"


def test_extractive_span_without_what_restates_the_question(tiny):
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("Ada Lovelace was born on 10 December 1815")))
    result = answer(model, tok, "When was Ada Lovelace born?", LOVELACE, extractive=True, no_answer_threshold=-1e9)
    assert result.answer == "10 December 1815" and result.sentence == "Ada Lovelace was born on 10 December 1815"
    assert LOVELACE[result.evidence["start"]:result.evidence["end"]] == result.answer == result.evidence["text"]
    whole = answer(model, tok, "When was Ada Lovelace born?", LOVELACE, extractive=True, no_answer_threshold=-1e9,
                   concise=False)
    assert whole.answer == "Ada Lovelace was born on 10 December 1815" and whole.sentence is None


def test_extractive_answer_is_the_documents_spelling_of_the_free_answer(tiny):
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("paris,  france")))
    result = answer(model, tok, "Where?", CONTEXT, extractive=True, no_answer_threshold=-1e9)
    assert result.answer == "Paris, France" == CONTEXT[result.evidence["start"]:result.evidence["end"]]
    assert result.sentence == "paris,  france"  # the model's own spelling


def test_calibrated_rule_answers_even_when_the_model_says_no_answer(tiny):
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("Not mentioned in the context.")))
    alone = QASession(model, tok, LOVELACE, no_answer_threshold=None).ask("When was Ada Lovelace born?")
    assert alone.no_answer  # the model deciding alone
    ruled = QASession(model, tok, LOVELACE, no_answer_threshold=-1e9).ask("When was Ada Lovelace born?")
    assert not ruled.no_answer and ruled.answer in LOVELACE  # the rule said answer: the best span
    e = ruled.evidence
    assert LOVELACE[e["start"]:e["end"]] == ruled.answer


def test_generated_answer_falling_back_to_a_span_is_shortened_too(tiny, monkeypatch):
    import mlxllama.qa.session as qs

    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("Ada Lovelace was born on 10 December 1815")))
    monkeypatch.setattr(qs, "grounded", lambda answer, passages: False)  # as if the words were not read there
    # (a question of no kind answer_type knows, so the span is decoded)
    result = QASession(model, tok, LOVELACE, no_answer_threshold=None).ask("Where was Ada Lovelace born?")
    # the best span instead ("Ada Lovelace was born on 10 December 1815"), then its short form
    assert result.answer == "10 December 1815" and result.sentence == "Ada Lovelace was born on 10 December 1815"
    assert LOVELACE[result.evidence["start"]:result.evidence["end"]] == result.answer


def test_concise_answer_leaves_short_or_unfound_answers_alone():
    assert concise_answer("1815", "When was she born?", [LOVELACE]) is None  # already short
    assert concise_answer("She was born in Vienna in 1820.", "When was she born?", [LOVELACE]) is None  # not there
    assert concise_answer("在伦敦。", "她在哪里出生？", ["她在伦敦出生。"]) is None  # nothing restated


def test_concise_answer_in_chinese():
    passage = "空间站运行在约400公里高的轨道上，通常由三名航天员驻留。1987年，长城被列入世界遗产名录。"
    assert concise_answer("空间站运行在约400公里高的轨道上", "空间站运行在多高的轨道上？", [passage]) == "约400公里"
    # the clause that restates the question goes, whichever comes first
    assert concise_answer("1987年，长城被列入世界遗产名录。", "长城哪一年被列入世界遗产名录？", [passage]) == "1987年"
    assert concise_answer("长城被列入世界遗产名录，1987年", "长城哪一年被列入世界遗产名录？", [passage]) == "1987年"
    assert concise_answer("空间站运行在约500公里高的轨道上", "空间站运行在多高的轨道上？", [passage]) is None


def test_grounded_answers_share_a_word_with_the_documents():
    assert grounded("Lord Byron", [LOVELACE]) and grounded("the poet", [LOVELACE])
    assert not grounded("1889", [LOVELACE])  # the prompt's worked example, not the documents
    assert grounded("...", [LOVELACE])  # nothing to check


# a section of a README: a table of commands, one of whose examples holds the question itself
USAGE = """# tool

Run `tool --help` for the options.

## Commands

| command | example | what it does |
| --- | --- | --- |
| `qa` | `tool qa --context docs/ "How do I serve the API?"` | answer questions about documents |
| `serve` | `tool serve --port 8080` | an HTTP server for the API |

```
tool/         the package
  serve/      the HTTP server
```

```bash
pip install tool && tool convert ./model -o ./out
```
"""


def test_code_spans_are_exact_offsets_without_backticks():
    spans = [USAGE[a:b] for a, b in code_spans(USAGE)]
    assert spans[:3] == ["tool --help", "qa", 'tool qa --context docs/ "How do I serve the API?"']
    assert "tool serve --port 8080" in spans and "pip install tool && tool convert ./model -o ./out" in spans
    assert "tool/         the package" in spans  # a fenced line, kept whole
    assert not any("`" in s for s in spans)


@pytest.mark.parametrize("question, command", [
    ("How do I serve the API?", "tool serve --port 8080"),  # not the example holding the question
    ("how can I install it", "pip install tool && tool convert ./model -o ./out"),
    ("How to convert a model?", "pip install tool && tool convert ./model -o ./out"),
    ("How do I see the options?", None),  # no code holds a word of the question
    ("Where is the HTTP server?", None),  # not a question about how to do something
])
def test_command_answer_for_how_to_questions(question, command):
    found = command_answer(question, ["No code here, only prose about serving.", USAGE])
    assert (found and USAGE[found[1]:found[2]]) == command and (found is None or found[0] == 1)


def test_asks_how():
    assert asks_how("How do I serve the API?") and asks_how("how to export a GGUF") and asks_how("How can we run it?")
    assert not asks_how("How does Rust guarantee memory safety?") and not asks_how("How long is the term?")


@pytest.mark.parametrize("extractive", [False, True], ids=["generative", "extractive"])
def test_how_to_question_is_answered_with_the_command(tiny, extractive):
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("You can run this command:")))
    if extractive:
        model = ScriptedModel(tok, by_bytes(tok, *bytes_of("How do I serve the API?")))
    pieces = []
    result = QASession(model, tok, {"README.md": USAGE}, extractive=extractive,
                       no_answer_threshold=None if not extractive else -1e9).ask("How do I serve the API?", pieces.append)
    assert result.answer == "tool serve --port 8080" and not result.no_answer
    e = result.evidence
    assert USAGE[e["start"]:e["end"]] == e["text"] == result.answer and e["source"] == "README.md"
    assert result.citations[0]["heading"] == "tool > Commands"
    assert result.answer in "".join(pieces)  # shown after the model's sentence, or as the span
    if not extractive:
        assert result.sentence == "You can run this command:"


def test_generated_sentence_is_shortened_and_kept(tiny):
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("Ada Lovelace was born on 10 December 1815.")))
    result = QASession(model, tok, LOVELACE, no_answer_threshold=None).ask("When was Ada Lovelace born?")
    assert result.answer == "10 December 1815" and result.sentence == "Ada Lovelace was born on 10 December 1815."
    assert LOVELACE[result.evidence["start"]:result.evidence["end"]] == "10 December 1815"
    full = QASession(model, tok, LOVELACE, no_answer_threshold=None, concise=False).ask("When was Ada Lovelace born?")
    assert full.answer == "Ada Lovelace was born on 10 December 1815." and full.sentence is None


# -- the kind of answer asked for: quantities, dates, names -------------------------------------

from mlxllama.qa.answer_type import expected_kind, typed_answer, typed_spans  # noqa: E402

MINUTES = ("The meeting was chaired by Leah Okafor on 14 March 2025. The board approved a budget of $2.4 million. "
           "Ines Duarte will lead the hiring of 12 nurses. Construction is to begin in June. "
           "The next meeting is on 9 May 2025 at 5 pm.")


@pytest.mark.parametrize("question, kind", [
    ("How many nurses will be hired?", "quantity"),
    ("How long must the reset button be held?", "quantity"),
    ("At what temperature should green tea be brewed?", "quantity"),
    ("What is the IT desk extension?", "quantity"),
    ("When is the next meeting?", "date"),
    ("In what year was the reef declared a World Heritage Site?", "date"),
    ("Who chaired the meeting?", "name"),
    ("空间站通常由几名航天员驻留？", "quantity"),
    ("天和核心舱什么时候发射？", "date"),
    ("What does vacca mean?", None),
    ("Which licence is required?", None),
])
def test_expected_kind_of_answer(question, kind):
    assert expected_kind(question) == kind


def test_typed_spans_take_units_but_not_what_the_question_counts():
    text = "Green tea is brewed at 80 degrees Celsius for four to five minutes; £32,000 per year; an eight-year-old boy."
    spans = [text[a:b] for a, b in typed_spans(text, "quantity")]
    assert spans == ["80 degrees Celsius", "four to five minutes", "£32,000", "eight-year-old"]
    count = "It hires 12 nurses in 2025."
    assert [count[a:b] for a, b in typed_spans(count, "quantity", count=True)] == ["12"]  # no unit, no year
    length = "根据2012年的测量，长城的总长度为21196千米。"
    assert [length[a:b] for a, b in typed_spans(length, "quantity")] == ["21196千米"]
    dates = "Rust 1.0 was released on 15 May 2015. Invoice 2024-0317 is due in June, by 1889."
    assert [dates[a:b] for a, b in typed_spans(dates, "date")] == ["15 May 2015", "June", "1889"]
    phone = "Daniel Osei, phone 0161 555 0178; ext. 4400."
    assert [phone[a:b] for a, b in typed_spans(phone, "quantity")] == ["0161 555 0178", "4400"]
    names = "The poet Lord Byron met Charles Babbage."
    assert [names[a:b] for a, b in typed_spans(names, "name")] == ["Lord Byron", "Charles Babbage"]


@pytest.mark.parametrize("question, expected", [
    ("How many nurses will be hired?", "12"),  # not the date the sentence also holds
    ("Who will lead the hiring of nurses?", "Ines Duarte"),
    ("Who chaired the meeting?", "Leah Okafor"),
    ("When is construction to begin?", "June"),
    ("When is the next meeting?", "9 May 2025 at 5 pm"),
    ("What budget did the board approve?", "$2.4 million"),
    ("What did the board decide?", None),  # no kind asked for: left to the model
    ("How many patients were treated?", None),  # no sentence shares a word with it ("how many" is its form)
])
def test_typed_answer_is_the_span_of_the_kind_nearest_the_question(question, expected):
    found = typed_answer(question, [MINUTES])
    if expected is None:
        assert found is None
    else:
        assert found.text == expected == MINUTES[found.start:found.end]


def test_typed_answer_keeps_the_models_span_in_the_best_sentence_only():
    text = "Order 2025-041 was placed by Fernhill Bakery on 3 April 2025 for 40 sacks of rye flour. It cost 90 pounds."
    q = "How many sacks of rye flour did Fernhill Bakery order?"
    assert typed_answer(q, [text]).text == "40"  # nearest the question's words, not the order number
    assert typed_answer(q, [text], said="2025-041").text == "2025-041"  # the model's pick in that sentence
    assert typed_answer(q, [text], said="90").text == "40"  # a sentence that holds none of the question's words
    assert typed_answer("空间站运行在多高的轨道上？", ["天和核心舱于2021年4月29日发射。空间站运行在约400公里高的轨道上，通常由三名航天员驻留。"]).text \
        == "约400公里"
    assert typed_answer("Who started Rust?", ["Rust is a language."]) is None  # only the question's own name


@pytest.mark.parametrize("extractive", [False, True])
def test_question_asking_for_a_number_is_answered_with_it(tiny, extractive):
    _, tok = tiny
    # the model names the wrong part of the right sentence
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("Ines Duarte will lead the hiring")))
    result = answer(model, tok, "How many nurses will be hired?", MINUTES, extractive=extractive,
                    no_answer_threshold=-1e9)
    assert result.answer == "12" == MINUTES[result.evidence["start"]:result.evidence["end"]]
    assert result.sentence == "Ines Duarte will lead the hiring"
    full = answer(model, tok, "How many nurses will be hired?", MINUTES, extractive=extractive,
                  no_answer_threshold=-1e9, concise=False)
    assert full.answer == "Ines Duarte will lead the hiring"  # --full-answer keeps the model's words


def test_what_is_it_called_and_the_name_of():
    rust = ("Its package manager is called Cargo, and packages are published on crates.io. The compiler is called "
            "rustc. The first user was a milkmaid named Sarah Nelmes.")
    assert typed_answer("What is Rust's package manager called?", [rust]).text == "Cargo"
    assert typed_answer("What is the Rust compiler called?", [rust]).text == "rustc"
    assert typed_answer("What is the name of the milkmaid?", [rust]).text == "Sarah Nelmes"


@pytest.mark.parametrize("question, expected", [
    ("长城东起哪里？", "山海关"),  # up to the clause's end
    ("现存的长城大多修建于哪个朝代？", "明朝"),  # the noun after 哪个 is the answer's kind, not in the sentence
    ("天和核心舱在哪里发射？", "海南文昌航天发射场"),  # between 在 and the last 发射 of the clause
    ("大熊猫主要生活在哪些省份？", "四川、陕西和甘肃的山区"),
    ("谁修建了金字塔？", None),  # nothing of the question's text in the passages
])
def test_chinese_question_aligned_with_its_sentence(question, expected):
    passages = ["长城大多修建于明朝。长城东起山海关，西至嘉峪关。",
                "核心舱“天和”于2021年4月29日在海南文昌航天发射场发射。大熊猫主要生活在四川、陕西和甘肃的山区。"]
    found = typed_answer(question, passages)
    if expected is None:
        assert found is None
    else:
        assert found.text == expected == passages[found.passage][found.start:found.end]


def test_prompt_labels_are_not_part_of_an_answer(tiny):
    from mlxllama.qa.prompt import strip_labels

    assert strip_labels("[3] (handbook.md - Pensions)\n## Pensions\nThe scheme pays 5%.") == "The scheme pays 5%."
    assert strip_labels("[1] 25 days") == "25 days" and strip_labels("## Pensions") == "Pensions"
    assert strip_labels("(about 80) degrees") == "(about 80) degrees"  # not a label: text follows on its line
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("[1] the city of Paris")))
    result = QASession(model, tok, CONTEXT, no_answer_threshold=None, concise=False).ask("Where did we meet?")
    assert result.answer == "the city of Paris" and result.evidence["text"] == "the city of Paris"


def test_typed_answer_is_not_taken_from_a_sentence_about_something_else():
    notes = ("A doctor's note is required for every absence of more than a week. "
             "The office opened in 1998 and a note of thanks was sent.")
    # the second sentence holds the question's word "note" only, and its year is no answer
    assert typed_answer("When is a doctor's note required?", [notes]) is None


def test_an_answer_that_is_only_a_prompt_label_gets_the_best_span(tiny):
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("[1] (notes.md)")))
    ruled = QASession(model, tok, LOVELACE, no_answer_threshold=-1e9).ask("When was Ada Lovelace born?")
    assert not ruled.no_answer and ruled.answer == "10 December 1815"  # the rule decided to answer
    alone = QASession(model, tok, LOVELACE, no_answer_threshold=None).ask("When was Ada Lovelace born?")
    assert alone.no_answer  # the model deciding alone said nothing
