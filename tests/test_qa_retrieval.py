"""QA retrieval and answer shape: section chunks with heading paths, stemmed BM25 finding a needle
section in a 50-page document, the model reranker, bounded reading, shortest extractive spans,
citations, and a question never returned as its answer."""

from __future__ import annotations

import json
import random

import mlx.core as mx
import pytest

from mlxllama.models.cache import KVCache
from mlxllama.qa import Document, QASession, answer
from mlxllama.qa.rerank import question_likelihoods, rerank
from mlxllama.qa.retrieve import Chunk, coverage, heading_at, question_terms, rank, split_sections, terms
from test_qa import CONTEXT, ScriptedModel, by_bytes, bytes_of, tiny, tiny_dir  # noqa: F401 (fixtures)

TOPICS = ["budget", "safety", "garden", "library", "transport", "parking", "catering", "cleaning"]


def fifty_pages(seed: int = 0) -> tuple[str, str]:
    """About 50 pages (3,000 characters each) of Markdown sections of look-alike filler, with one
    needle section; returns (text, needle sentence)."""
    rnd = random.Random(seed)
    sections = []
    for i in range(160):
        topic = rnd.choice(TOPICS)
        body = " ".join(f"Meeting {i}.{k} noted that the {topic} committee reviewed routine matters, "
                        f"approved the minutes and found nothing unusual in the {rnd.choice(TOPICS)} report."
                        for k in range(8))
        sections.append(f"## Minutes {i}: {topic}\n\n{body}")
    needle = "Deliveries to the observatory are received at the north loading dock by Priya Raman."
    sections.insert(83, f"## Observatory deliveries\n\nAll parcels for the observatory go through one place. {needle}")
    return "# Committee records\n\n" + "\n\n".join(sections), needle


def test_section_chunks_keep_paragraphs_headings_and_offsets():
    text = ("# Guide\n\nIntro paragraph.\n\n## Serving\n\nRun the server.\n\n```bash\n# not a heading\n\nmlxllama serve\n```\n\n"
            "### Security\n\nUse a key.\n\n## LoRA\n\n" + "Long sentence about training. " * 40)
    chunks = split_sections(Document("g.md", text), 200)
    for c in chunks:
        assert text[c.start : c.end] == c.text and c.text.strip() == c.text
    by_heading = {c.heading for c in chunks}
    assert {"Guide", "Guide > Serving", "Guide > Serving > Security", "Guide > LoRA"} <= by_heading
    assert not any("not a heading" in h for h in by_heading)  # '#' inside a code fence
    assert sum(c.heading == "Guide > LoRA" for c in chunks) > 2 and max(len(c.text) for c in chunks) <= 200
    assert heading_at(text, text.index("Use a key")) == "Guide > Serving > Security"


def test_stemming_and_stopwords():
    assert terms("How do I serve the API?") == terms("serving apis")
    assert "the" not in terms("the serving") and "serv" in terms("served")


def test_coverage_leaves_out_the_words_of_the_question_form():
    invoice = [Chunk("invoice.txt", 0, 40, "40 oak shelves at $85.00 each", heading="Invoice")]
    assert question_terms("How long must the reset button be held?") == set(terms("reset button held"))
    assert coverage("How many oak shelves?", invoice) == 1.0  # "many" is the form, not the topic
    assert coverage("How much does one oak shelf cost?", invoice) == 0.5  # shelf ~ shelves; "one", "cost" absent
    assert coverage("What colour are the oak chairs?", invoice) == pytest.approx(1 / 3)
    assert coverage("大熊猫生活在哪些省份？", [Chunk("a", 0, 9, "大熊猫生活在四川省份")]) == 1.0
    assert coverage("the?", invoice) == 1.0  # nothing to look for


def test_retrieval_finds_the_needle_section_in_a_50_page_document():
    text, needle = fifty_pages()
    assert len(text) > 50 * 3000
    chunks = split_sections(Document("records.md", text), 1200)
    for question in ["Where are deliveries to the observatory received?", "Who receives observatory parcels?"]:
        best = rank(chunks, question)[0]
        assert needle in best.text and best.heading == "Committee records > Observatory deliveries"


def test_bounded_reading_reads_the_budget_not_the_document(tiny):
    text, needle = fifty_pages(1)
    session = QASession(*tiny, {"records.md": text}, max_context=300, max_tokens=2, rerank=0)
    result = session.ask("Where are deliveries to the observatory received?")
    # the budget plus the prompt's own text and the question, not the 40,000 tokens of the document
    assert result.prompt_tokens <= 300 + session._fixed + 64
    first = result.chunks[0]
    assert "north loading dock" in text[first["start"] : first["end"]] and first["heading"].endswith("Observatory deliveries")


class CopyModel:
    """An induction head: predicts the token that followed the current one earlier in its row, so a
    question is likely after a chunk that holds its phrases. Batched, the model contract."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.calls = []

    def make_cache(self):
        return [KVCache()]

    def __call__(self, tokens, cache):
        B, L = tokens.shape
        self.calls.append((B, L))
        kv = mx.zeros((B, 1, L, 1))
        cache[0].update_and_fetch(kv, kv)
        rows = tokens.tolist()
        out = []
        for row in rows:
            logits = []
            for i, t in enumerate(row):
                line = [0.0] * self.vocab
                for j in range(i):
                    if row[j] == t:
                        line[row[j + 1]] = 4.0
                logits.append(line)
            out.append(logits)
        return mx.array(out)


def test_the_reranker_moves_the_right_chunk_up(tiny):
    _, tok = tiny
    model = CopyModel(len(tok))
    chunks = [Chunk("a", 0, 10, "Lunch is served at noon in the canteen on the first floor."),
              Chunk("b", 0, 10, "Parking permits are issued by reception every Monday morning."),
              Chunk("c", 0, 10, "The vault access code was chosen by Priya Raman last spring.", heading="Vault"),
              Chunk("d", 0, 10, "Visitors sign in at the front desk and wear a badge.")]
    question = "Who chose the vault access code?"
    ranked = rerank(model, tok, chunks, question)
    assert ranked[0].source == "c" and ranked[0].likelihood == max(c.likelihood for c in ranked)
    assert model.calls == [model.calls[0]] and model.calls[0][0] == 4  # one batched pass
    # padding never changes a row's likelihood: alone or in a batch, the same value
    alone = question_likelihoods(model, tok, [chunks[2]], question)[0]
    assert alone == pytest.approx(ranked[0].likelihood, abs=1e-5)


@pytest.mark.slow
def test_the_default_model_reranks_a_serving_section_up(default_model_dir):
    from mlxllama import load

    model, tok = load(default_model_dir)
    chunks = [Chunk("lora.md", 0, 1, "Fine-tune with mlxllama lora --data train.jsonl; adapters are saved every 100 steps.",
                    heading="Fine-tuning"),
              Chunk("serving.md", 0, 1, "Start the HTTP server with mlxllama serve --port 8080; clients call /v1/chat/completions.",
                    heading="Serving an OpenAI-compatible API")]
    assert rerank(model, tok, chunks, "How do I serve the API?")[0].source == "serving.md"


@pytest.mark.parametrize("eos_logit,expected", [(9.9, "Paris"), (5.0, "Paris, France")])
def test_extractive_spans_are_the_shortest_the_model_supports(tiny, eos_logit, expected):
    """The model writes "Paris, France"; when ending after "Paris" is about as likely as going on,
    the span is trimmed to "Paris", otherwise it is kept whole. Always an exact substring."""
    _, tok = tiny
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("Paris, France")))
    model.eos_logit = eos_logit
    result = answer(model, tok, "Where?", CONTEXT, extractive=True, no_answer_threshold=None)
    assert result.answer == expected
    e = result.evidence
    assert CONTEXT[e["start"] : e["end"]] == result.answer


def test_the_question_is_never_the_answer(tiny):
    _, tok = tiny
    question = "Where did we meet in the city?"
    parrot = ScriptedModel(tok, tok.encode(question, add_special_tokens=False))
    for extractive in (False, True):
        result = answer(parrot, tok, question, CONTEXT, extractive=extractive, no_answer_threshold=None)
        assert result.answer.strip().lower() != question.lower() and "?" not in result.answer
        assert result.no_answer or result.answer in CONTEXT


def test_generative_answers_cite_the_chunk_and_section(tiny):
    _, tok = tiny
    docs = {"guide.md": "# Guide\n\n## Places\n\nWe met in the city of Paris, France, on 3 May 1999.\n\n## Food\n\nWe ate bread.",
            "other.md": "Nothing about cities here, only notes on the weather in May."}
    model = ScriptedModel(tok, by_bytes(tok, *bytes_of("Paris, France")))
    result = answer(model, tok, "Where?", docs, no_answer_threshold=None, whole=True)
    (c,) = result.citations
    assert c["n"] == 1 and c["source"] == "guide.md" and c["heading"] == "Guide > Places"
    assert result.evidence["text"] == "Paris, France"


def test_cli_max_context_and_whole(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from mlxllama.cli import cli

    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\n" + "\n\n".join(f"## Part {i}\n\nItem {i} is stored in room {i}." for i in range(30)))

    def chunks(*args):
        r = CliRunner().invoke(cli, ["qa", "--model", tiny_dir, "--context", str(path), "--json", "-n", "1",
                                     "--rerank", "0", *args, "Where is item 7 stored?"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["chunks"]

    small = chunks("--max-context", "400")
    assert 1 <= len(small) <= 4 and "room 7" in path.read_text()[small[0]["start"] : small[0]["end"]]
    assert chunks("--max-context", "400", "--whole") == [
        {"source": str(path), "start": 0, "end": len(path.read_text()), "heading": "", "score": 0.0}]
