"""`mlxllama qa` (answer questions about files) and `mlxllama eval-qa` (score a JSONL dev set)."""

from __future__ import annotations

import json
import sys

import click

from ..errors import InputError
from .options import (Distributed, generation_option, kv_kwargs, kv_options, model_options, parallel_option,
                      prompt_cache_options, session_prefix_cache)


def threshold(value: str):
    """'auto' (the calibrated default), 'off' (the model decides alone) or a number."""
    if value in ("auto", "off"):
        return None if value == "off" else "auto"
    try:
        return float(value)
    except ValueError:
        raise InputError(f"--no-answer-threshold must be a number, 'auto' or 'off', got {value!r}") from None


def qa_options(f):
    f = generation_option("prompt_lookup", default=4,
                          help="Speculative decoding drafting N tokens from n-grams of the documents and question "
                               "(generative mode; greedy answers are unchanged, only sooner; 0: off).")(f)
    f = generation_option("seed")(f)
    f = generation_option("temp")(f)
    f = generation_option("max_tokens", default=64, lo=1, help="Longest answer in tokens.")(f)
    f = click.option("--no-answer-threshold", default="auto", show_default=True,
                     help="Answer only when the confidence (the model's margin for answering over the no-answer "
                          "phrase, plus a weight times the share of the question's words the passages hold) "
                          "reaches this; 'off' lets the model decide alone.")(f)
    f = click.option("--rerank", type=click.IntRange(min=0), default=6, show_default=True,
                     help="Rerank the best N BM25 chunks by the model's likelihood of the question (0: off).")(f)
    f = click.option("--top-chunks", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Most retrieved chunks in the prompt when the documents exceed --max-context.")(f)
    f = click.option("--whole", is_flag=True,
                     help="Read the documents whole when they fit the model's window (slower: no retrieval).")(f)
    f = click.option("--max-context", type=click.IntRange(min=32), default=1500, show_default=True,
                     help="Most document tokens the model reads; longer documents are chunked on paragraphs "
                          "and headings, ranked with BM25 and reranked by the model.")(f)
    f = click.option("--full-answer", is_flag=True,
                     help="Keep the model's whole sentence (with --extractive, the whole decoded span) as the "
                          "answer; by default the answer is the short part of it the documents hold word for word.")(f)
    f = click.option("--extractive", is_flag=True,
                     help="The answer is a span copied from the context, never invented text.")(f)
    return f


def qa_kwargs(o: dict) -> dict:
    return dict(extractive=o["extractive"], max_context=o["max_context"], whole=o["whole"],
                top_chunks=o["top_chunks"], rerank=o["rerank"], concise=not o["full_answer"],
                no_answer_threshold=threshold(o["no_answer_threshold"]), max_tokens=o["max_tokens"], temp=o["temp"],
                seed=o["seed"], prompt_lookup=o["prompt_lookup"])


def markers(result) -> str:
    """' [1][2]': the chunks an answer cites, as printed after it."""
    return "".join(f"[{c['n']}]" for c in result.citations)


def cite(result) -> str:
    """Where the answer is supported, one line per cited chunk (stderr)."""
    if result.no_answer or not result.evidence:
        return ""
    e = result.evidence
    lines = []
    for c in result.citations or [None]:
        where = f"[{c['n']}] " if c else ""
        where += f"{e['source']}"
        if c and c["heading"]:
            where += f" § {c['heading']}"
        quote = " ".join(e["text"].split())
        quote = quote if len(quote) <= 80 else quote[:77] + "..."
        lines.append(where + f", characters {e['start']}-{e['end']} \"{quote}\"; score {result.score:.2f}")
    return "\n".join(lines)


def progress_line():
    """A stderr progress line for reading long documents, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(done, total):
        if total >= 1024:
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\rreading documents: {done}/{total} tokens{end}")
            sys.stderr.flush()
    return show


def read_questions(positional, questions, interactive):
    qs = ([positional] if positional is not None else []) + list(questions)
    for q in qs:
        if not q.strip():
            raise InputError("the question is empty")
    if not qs and not interactive:
        raise InputError("no question given: pass QUESTION, --question TEXT or --interactive")
    return qs


def terminal_questions(dist=None):
    try:
        import readline  # noqa: F401
    except ImportError:
        pass
    while True:
        try:
            line = input("?> ") if dist is None else dist.read_line("?> ")
            if line is None:
                raise EOFError
        except EOFError:
            click.echo("")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip():
            yield line.strip()


@click.command("qa")
@model_options
@click.argument("question", required=False)
@click.option("--context", "contexts", multiple=True, required=True,
              help="A document (text, Markdown, PDF, HTML, DOCX), a folder of them, or '-' for stdin (repeatable).")
@click.option("--question", "questions", multiple=True,
              help="Another question about the same context (repeatable; each reuses the documents' KV cache).")
@click.option("--interactive", "-i", is_flag=True, help="Ask questions at a prompt until Ctrl-D.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per answer: answer, no_answer, evidence {source, start, end, text}, score, chunks.")
@qa_options
@kv_options
@prompt_cache_options
@parallel_option
@click.option("--verbose", "-v", is_flag=True, help="Also print tokens processed and seconds per answer.")
def qa_command(model, adapter_path, dtype, question, contexts, questions, interactive, as_json, verbose, parallel,
               dist_timeout, **opts):
    """Answer QUESTION from the text in --context, citing where the answer is."""
    dist = Distributed.start(dist_timeout)
    try:
        qs = read_questions(question, questions, interactive)
        if interactive and "-" in contexts:
            raise InputError("--interactive reads questions from the terminal: pass the context as a file, not '-'")
    except InputError as e:
        if dist is not None:
            dist.fail(str(e))  # rank 0 says it once
        raise
    if dist is None:
        return answer_all(model, adapter_path, dtype, contexts, qs, interactive, as_json, verbose, opts, None, None)
    if "-" in contexts:
        dist.fail("--context - cannot be read under mlx.launch (it passes no end of input on); "
                  "pass the context as a file")
    with dist.errors():
        answer_all(model, adapter_path, dtype, contexts, qs, interactive, as_json, verbose, opts, dist, parallel)
        dist.finish()


def shared_documents(dist, contexts):
    """The documents, read by rank 0 and sent to the others (whose files may differ or be absent)."""
    from ..qa import read_context
    from ..qa.context import Document

    if dist is None:
        return read_context(contexts)
    payload = None
    if dist.rank == 0:
        try:
            payload = json.dumps({"docs": [[d.source, d.text] for d in read_context(contexts)]})
        except InputError as e:
            payload = json.dumps({"error": str(e)})
    data = json.loads(dist.d.broadcast_text(payload, dist.group))
    if "error" in data:
        dist.fail(data["error"])
    return [Document(source, text) for source, text in data["docs"]]


def answer_all(model, adapter_path, dtype, contexts, qs, interactive, as_json, verbose, opts, dist, parallel):
    from ..loader import load
    from ..qa import QASession

    docs = shared_documents(dist, contexts)
    kv = kv_kwargs(opts)
    kwargs = qa_kwargs(opts)
    if dist is None:
        llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)
        prefix_cache = session_prefix_cache(llm, tokenizer, opts)
    else:  # every rank runs every model pass (retrieval, reranking, scoring, answering) on the same input
        llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype, parallel=parallel)
        llm = dist.watch(llm)
        prefix_cache = None  # each rank holds only its part of the KV state
        shared = dist.sampling({"temp": kwargs["temp"], "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": kwargs["seed"]})
        kwargs.update(seed=shared["seed"], sampler=shared["sampler"])
    rank0 = dist is None or dist.rank == 0
    session = QASession(llm, tokenizer, docs, prefix_cache=prefix_cache, progress=progress_line() if rank0 else None,
                        **kwargs, **kv)
    several = len(qs) > 1 or interactive

    def note(line):  # stderr lines: rank 0 speaks for all
        if rank0:
            click.echo(line, err=True)

    def stream(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def ask(q):
        if as_json:
            result = session.ask(q)
            click.echo(json.dumps(result.as_dict(), ensure_ascii=False))
            return
        if several and not interactive:
            click.echo(f"Q: {q}")
            sys.stdout.write("A: ")
        result = session.ask(q, on_text=stream)
        # generative answers end with the numbers of the chunks they cite; an extractive answer
        # stays the exact span on stdout (its chunk is named on stderr)
        cited = result.citations and not result.no_answer and not result.extractive
        stream((f" {markers(result)}" if cited else "") + "\n")
        line = cite(result)
        if line:
            note(line)
        if verbose:
            reused = f", {session.reused_tokens} from the prompt cache" if session.reused_tokens else ""
            note(f"[{result.prompt_tokens} prompt tokens{reused}, {result.generation_tokens} generated, "
                 f"{result.seconds:.2f} s]")
        if several and not interactive:
            click.echo("")

    for q in qs:
        ask(q)
    if interactive:
        for q in terminal_questions(dist):
            ask(q)


@click.command("eval-qa")
@model_options
@click.argument("data", type=click.Path())
@qa_options
@click.option("--split", default=None, help="Evaluate only the items whose 'split' is this (e.g. tune, test).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate the first N items only.")
@click.option("--predictions", type=click.Path(), default=None, help="Write every prediction to this JSONL file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Print each prediction as it is made.")
def eval_qa_command(model, adapter_path, dtype, data, split, limit, predictions, as_json, verbose, **opts):
    """Score answers on a JSONL dev set ({id, context, question, answers}): SQuAD exact match and F1,
    no-answer accuracy, answers per second."""
    from ..loader import load
    from ..qa.evaluate import evaluate
    from ..qa.metrics import read_dataset

    items = read_dataset(data)
    if split is not None:
        items = [i for i in items if i.get("split") == split]
        if not items:
            raise InputError(f"no items with split {split!r} in {data}")
    items = items[:limit]
    llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)

    def progress(i, p):
        if verbose:
            shown = "<no answer>" if p["no_answer"] else p["prediction"]
            click.echo(f"[{i + 1}/{len(items)}] {p['id']}: {shown!r}  gold={p['answers'][:2]}  "
                       f"f1={p['f1']:.2f}", err=True)

    report = evaluate(llm, tokenizer, items, progress=progress, **qa_kwargs(opts))
    if predictions:
        with open(predictions, "w", encoding="utf-8") as f:
            for p in report.predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    summary = report.summary()
    summary["mode"] = "extractive" if opts["extractive"] else "generative"
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"mode               {summary['mode']}")
    click.echo(f"items              {summary['items']}")
    click.echo(f"exact match        {summary['exact_match']:.1f}")
    click.echo(f"F1                 {summary['f1']:.1f}")
    click.echo(f"has-answer EM/F1   {summary['has_answer_em']:.1f} / {summary['has_answer_f1']:.1f}")
    click.echo(f"no-answer accuracy {summary['no_answer_accuracy']:.1f}")
    click.echo(f"false no-answer    {summary['false_no_answer']:.1f}")
    click.echo(f"answers/s          {summary['answers_per_second']:.2f}  ({summary['seconds']:.1f} s)")
