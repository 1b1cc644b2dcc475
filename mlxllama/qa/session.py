"""Answering questions about a context: `answer()` for one question, `QASession` for several.

A session prefills the prompt's document part once and, per question, trims the KV cache back to
the end of the documents and feeds only the question's tokens.

Bounded reading: the model reads at most `max_context` tokens of documents (1,500 by default,
whatever the documents' size; `whole=True` reads everything that fits the window). A context
longer than that is cut into chunks on paragraph and heading boundaries, ranked by BM25 against
each question, the best candidates reranked by the model's query likelihood (one batched pass),
and the best chunks go into the prompt (the cache is reused while they stay the same).

No answer: the prompt teaches a fixed phrase (NO_ANSWER). Before answering, the question and that
phrase go through the model in one pass, giving the model's margin: log P(best first token of a
real answer) - log P(phrase). The decision adds the retrieval signal (the share of the question's
terms found in the passages): confidence = margin + weight * coverage; below the threshold (both
chosen on the tuning split of examples/qa_dev.jsonl) the answer is the phrase and nothing is
generated. Otherwise the answer is generated with the phrase's first token banned, so it streams.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import mlx.core as mx

from ..errors import InputError
from ..generate import check_kv, context_length, stream_generate
from ..models import make_cache
from ..models.cache import maybe_quantize
from .answer_type import typed_answer
from .concise import command_answer, concise_answer, grounded
from .context import ContextLike, as_documents
from .prompt import NO_ANSWER, context_block, encode_parts, is_no_answer, label, prompt_parts, strip_labels
from .retrieve import Chunk, coverage, heading_at, rank, split_sections
from .retrieve import whole as whole_chunk

MIN_CHUNK_TOKENS = 32
DEFAULT_MAX_CONTEXT = 1500  # tokens of documents the model reads by default
# confidence = margin + COVERAGE_WEIGHT * coverage; answer only when it reaches the threshold.
# Chosen on the tuning split of examples/qa_dev.jsonl for the default 135M model (see docs/qa.md);
# with larger models try a threshold of 0. None leaves the decision to the model alone.
COVERAGE_WEIGHT = {"generative": 17.5, "extractive": 17.5}
NO_ANSWER_THRESHOLD = {"generative": 9.5, "extractive": 9.5}
# an extractive span is trimmed to the shortest one whose log P(span + EOS) is within this of the best
SPAN_MARGIN = 1.5
_SENTENCE = re.compile(r"[^\n.!?。！？]+[.!?。！？]*")


@dataclass
class Answer:
    question: str
    answer: str
    no_answer: bool
    evidence: dict | None  # {source, start, end, text}: where the answer is supported
    score: float  # geometric-mean probability of the answer's tokens (0..1)
    chunks: list[dict] = field(default_factory=list)  # passages in the prompt: {source, start, end, score}
    extractive: bool = False
    prompt_tokens: int = 0  # tokens processed for this question (a reused document cache is free)
    generation_tokens: int = 0
    seconds: float = 0.0
    margin: float | None = None  # log P(answer's first token) - log P(no-answer phrase)
    coverage: float | None = None  # share of the question's terms found in the passages
    confidence: float | None = None  # margin + weight * coverage; below the threshold: no answer
    citations: list[dict] = field(default_factory=list)  # [{n, source, start, end, heading}]: chunk [n] supports the answer
    sentence: str | None = None  # the model's own words, when `answer` is the short answer found in them

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_PROMPT_LOOKUP = 4  # tokens drafted from n-grams of the documents (generative answers)


def located(chunk: Chunk, start: int, end: int, text: str) -> dict:
    """An answer's evidence: `text` at chunk-relative offsets start .. end, as document offsets."""
    return {"source": chunk.source, "start": chunk.start + start, "end": chunk.start + end, "text": text}


class QASession:
    """Answers questions about one context, reusing the documents' KV cache between questions."""

    def __init__(self, model, tokenizer, context: ContextLike, *, extractive: bool = False,
                 max_context: int | None = DEFAULT_MAX_CONTEXT, whole: bool = False, max_tokens: int = 64,
                 top_chunks: int = 4, chunk_tokens: int = 300, rerank: int = 6,
                 no_answer_threshold: float | str | None = "auto", concise: bool = True,
                 progress: Callable[[int, int], None] | None = None, prefix_cache=None, **gen_kwargs):
        if max_context is not None and max_context < MIN_CHUNK_TOKENS:
            raise InputError(f"max_context must be at least {MIN_CHUNK_TOKENS} tokens, got {max_context}")
        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.docs = as_documents(context)
        self.extractive, self.max_context, self.max_tokens = extractive, None if whole else max_context, max_tokens
        self.top_chunks, self.chunk_tokens = max(1, top_chunks), max(MIN_CHUNK_TOKENS, chunk_tokens)
        self.rerank, self.progress = max(0, rerank), progress
        self.concise = concise  # a generated sentence that restates the question -> its short answer
        mode = "extractive" if extractive else "generative"
        self.coverage_weight = COVERAGE_WEIGHT[mode]
        if no_answer_threshold == "auto":
            no_answer_threshold = NO_ANSWER_THRESHOLD[mode]
        elif isinstance(no_answer_threshold, str):
            raise InputError(f"no_answer_threshold must be a number, None or 'auto', got {no_answer_threshold!r}")
        self.no_answer_threshold = no_answer_threshold
        gen_kwargs.pop("max_kv_size", None)  # the document cache must keep every position
        # the documents' KV state is looked up in, and given to, the prefix cache (with a disk
        # tier: a later process reads it instead of the documents)
        self.prefix_cache = prefix_cache
        check_kv(model, gen_kwargs.get("kv_bits"), gen_kwargs.get("kv_group_size", 64))
        self.kv = (gen_kwargs.get("kv_bits"), gen_kwargs.get("kv_group_size", 64), gen_kwargs.get("quantized_kv_start", 0))
        self.reused_tokens = 0  # document tokens of the last question that came from the prefix cache
        # answers copy the documents: drafting from them is the same output, sooner
        gen_kwargs.setdefault("prompt_lookup", DEFAULT_PROMPT_LOOKUP)
        # an answer ends at its first blank line: past it a small model goes on inventing
        gen_kwargs.setdefault("stop", ["\n\n"])
        self.gen_kwargs = gen_kwargs
        self.window = context_length(model)
        before, after = prompt_parts(tokenizer, [Chunk("", 0, 0, "")])
        fixed_doc, fixed_tail = encode_parts(tokenizer, before, "", after)
        self._fixed = len(fixed_doc) + len(fixed_tail)
        whole_docs = [whole_chunk(d, i) for i, d in enumerate(self.docs)]
        self._whole = whole_docs
        self._whole_tokens = (len(tokenizer.encode(context_block(whole_docs), add_special_tokens=False))
                              if sum(len(d.text) for d in self.docs) < 2_000_000 else None)  # None: surely too long
        self._chunked: tuple[int, list[Chunk]] | None = None
        self.cache: list | None = None
        self.cached_doc: list[int] = []
        self._in_cache: list[int] = []  # every token the cache holds
        self._span_contexts: dict = {}

    # -- which passages go into the prompt ------------------------------------------------------

    def budget(self, question_tokens: int) -> int:
        """Tokens left for the documents once the prompt's fixed text, the question and the answer fit."""
        limits = [self.max_context] if self.max_context else []
        if self.window:
            reserve = self.max_tokens + 16  # the answer, or the no-answer phrase that is scored
            limits.append(self.window - self._fixed - question_tokens - reserve)
        room = min(limits) if limits else 1 << 30
        if room < MIN_CHUNK_TOKENS:
            what = f"--max-context {self.max_context}" if self.max_context and room == self.max_context else \
                f"the model's context of {self.window} tokens"
            raise InputError(f"the question and answer leave no room for the documents in {what}")
        return room

    def passages(self, question: str, question_tokens: int) -> list[Chunk]:
        room = self.budget(question_tokens)
        if self._whole_tokens is not None and self._whole_tokens <= room:
            return self._whole
        size = min(self.chunk_tokens, max(MIN_CHUNK_TOKENS, room // self.top_chunks))
        while True:
            ranked = rank(self._chunks(size), question)
            if ranked and ranked[0].score > 0:
                ranked = [c for c in ranked if c.score > 0]  # the rest share no term with the question
            if self.rerank and len(ranked) > self.top_chunks:  # the model picks among the best candidates
                from .rerank import rerank

                ranked = rerank(self.model, self.tokenizer, ranked[: max(self.rerank, self.top_chunks)], question)
            chosen, used = [], 0
            for chunk in ranked:
                name = f"[{len(chosen) + 1}] ({label(chunk)})\n\n"  # the line naming it in the prompt
                n = len(self.tokenizer.encode(name + chunk.text, add_special_tokens=False))
                if used + n <= room:
                    chosen.append(chunk)
                    used += n
                if len(chosen) == self.top_chunks:
                    break
            if chosen:
                return chosen
            if size <= MIN_CHUNK_TOKENS // 2:
                raise InputError("no chunk of the context fits in the token budget; raise --max-context")
            size //= 2

    def _chunks(self, size_tokens: int) -> list[Chunk]:
        if self._chunked is None or self._chunked[0] != size_tokens:
            chunks = []
            for i, doc in enumerate(self.docs):
                sample = doc.text[:20000]
                per_token = len(sample) / max(1, len(self.tokenizer.encode(sample, add_special_tokens=False)))
                chars = max(32, int(size_tokens * per_token * 0.9))
                chunks.extend(split_sections(doc, chars, i))
            self._chunked = (size_tokens, chunks)
        return self._chunked[1]

    # -- the document cache ---------------------------------------------------------------------

    def _prefill_documents(self, doc_tokens: list[int]) -> int:
        """Makes the cache hold exactly `doc_tokens`; returns how many tokens that processed."""
        if self.cache is not None and self.cached_doc == doc_tokens:
            extra = self.cache[0].offset - len(doc_tokens)
            if extra > 0:
                for c in self.cache:
                    c.trim(extra)
            return 0
        self.cache, done = self._from_prefix_cache(doc_tokens)
        self.cached_doc = []
        bits, group, start = self.kv
        tokens = mx.array(doc_tokens, dtype=mx.int32)
        for i in range(done, len(doc_tokens), 512):
            self.model(tokens[i : i + 512][None], cache=self.cache)
            maybe_quantize(self.cache, bits, group, start)
            mx.eval([c.state for c in self.cache])
            if self.progress:
                self.progress(min(i + 512, len(doc_tokens)), len(doc_tokens))
        self.cached_doc = list(doc_tokens)
        if self.prefix_cache is not None and done < len(doc_tokens):
            from ..engine import kind_of

            kind = kind_of(getattr(self.cache[0], "bits", None), getattr(self.cache[0], "group_size", 64))
            self.prefix_cache.insert(doc_tokens, [c.state for c in self.cache], kind)
        return len(doc_tokens) - done

    def _from_prefix_cache(self, doc_tokens: list[int]) -> tuple[list, int]:
        """A cache holding as much of the documents as the prefix cache has; how many tokens that is."""
        self.reused_tokens = 0
        if self.prefix_cache is None:
            return make_cache(self.model), 0
        from ..engine import KVQuant, kind_of
        from ..engine.batch import caches_from_states

        bits, group, start = self.kv
        kinds = ("float",) if bits is None else (kind_of(bits, group), "float")
        hit = self.prefix_cache.lookup(doc_tokens, kinds, keep_last=False)
        if hit is None:
            return make_cache(self.model), 0
        self.reused_tokens = hit.length
        return caches_from_states(self.model, hit.states, KVQuant(bits, group, start)), hit.length

    # -- answering --------------------------------------------------------------------------------

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Answer:
        """Answers one question; `on_text` receives the answer's text as it is generated
        (extractive answers and no-answers arrive whole)."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        tic = time.perf_counter()
        q_tokens = len(self.tokenizer.encode(question, add_special_tokens=False)) + 2
        chunks = self.passages(question, q_tokens)
        before, after = prompt_parts(self.tokenizer, chunks)
        doc_tokens, tail = encode_parts(self.tokenizer, before, question, after)
        processed = self._prefill_documents(doc_tokens) + len(tail)
        step0, na_lp, phrase = self._score_no_answer(tail)
        self._coverage = coverage(question, chunks)
        if self.extractive:
            result = self._extract(question, chunks, tail[-1], step0, na_lp, phrase, on_text)
        else:
            result = self._generate(question, chunks, tail[-1], step0, na_lp, phrase, on_text)
        result.chunks = [c.as_dict() for c in chunks]
        result.coverage = round(self._coverage, 4)
        if result.margin is not None:
            result.confidence = self._confidence(result.margin)
        if result.evidence:
            result.citations = cite(result.evidence, chunks)
        result.prompt_tokens = processed
        result.seconds = time.perf_counter() - tic
        return result

    def _score_no_answer(self, tail: list[int]) -> tuple[mx.array, float, list[int]]:
        """Runs the question and the no-answer phrase through the model in one pass. Returns the
        first step's log-probabilities (V,), log P(phrase + EOS | prompt) and the phrase's tokens;
        the cache is left holding the documents and all but the question's last token."""
        eos = self.tokenizer.eos_token_id
        phrase = self.tokenizer.encode(NO_ANSWER, add_special_tokens=False) + ([eos] if eos is not None else [])
        tokens = mx.array(tail + phrase[:-1], dtype=mx.int32)[None]
        logits = self.model(tokens, cache=self.cache)[0, len(tail) - 1 :]  # (len(phrase), V)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logprobs, mx.array(phrase)[:, None], axis=-1)
        extra = self.cache[0].offset - (len(self.cached_doc) + len(tail) - 1)
        for c in self.cache:
            c.trim(extra)
        self._in_cache = self.cached_doc + tail[:-1]  # what prompt lookup drafts from (the documents)
        return logprobs[0], float(picked.sum().item()), phrase

    def _margin(self, step0: mx.array, allowed: list[int] | None, na_lp: float, phrase: list[int]) -> float:
        """log P(the best first token of a real answer) - log P(no-answer phrase + EOS): the model's
        preference for answering, known before any answer token is generated."""
        banned = {phrase[0], *self.tokenizer.eos_token_ids}
        if allowed is None:
            best = float(mx.where(_mask(step0.shape[0], banned), -mx.inf, step0).max().item())
        else:
            ids = [i for i in allowed if i not in banned and i < step0.shape[0]]
            best = float(step0[mx.array(ids)].max().item()) if ids else -math.inf
        return best - na_lp

    def _confidence(self, margin: float) -> float:
        return margin + self.coverage_weight * self._coverage

    def _rejects(self, margin: float) -> bool:
        return self.no_answer_threshold is not None and self._confidence(margin) < self.no_answer_threshold

    def _rewind(self) -> None:
        """Trims the cache back to the documents and all but the question's last token."""
        extra = self.cache[0].offset - len(self._in_cache)
        if extra > 0:
            for c in self.cache:
                c.trim(extra)

    def _no_answer(self, question: str, margin: float | None, n: int = 0) -> Answer:
        return Answer(question, NO_ANSWER, True, None, 0.0, extractive=self.extractive, margin=margin,
                      generation_tokens=n)

    def _stream(self, last: int, processors: list, kwargs: dict | None = None):
        """Decodes the answer from the cached prompt; kwargs replaces the session's gen_kwargs."""
        kwargs = self.gen_kwargs if kwargs is None else kwargs
        return stream_generate(self.model, self.tokenizer, [last], max_tokens=self.max_tokens,
                               prompt_cache=self.cache, logits_processors=processors,
                               lookup_context=self._in_cache, **kwargs)

    def _generate(self, question, chunks, last, step0, na_lp, phrase, on_text) -> Answer:
        """With a no-answer threshold, the margin decides first, then the best answer that does not
        begin the no-answer phrase streams; without one, the model decides alone."""
        judged = self.no_answer_threshold is not None
        margin = self._margin(step0, None, na_lp, phrase) if judged else None
        if judged and self._rejects(margin):
            if on_text:
                on_text(NO_ANSWER)
            return self._no_answer(question, margin)
        text, shown, logprob, n = "", 0, 0.0, 0
        for r in self._stream(last, [BanFirst(phrase[0])] if judged else []):
            if r.token < 0:
                continue
            logprob += float((step0 if n == 0 else r.logprobs)[r.token].item())
            n += 1
            text += r.text
            visible = text.lstrip().rstrip("\ufffd")  # no leading space, no half character
            if on_text and len(visible) > shown:
                on_text(visible[shown:])
                shown = len(visible)
        answer = strip_labels(text.strip().rstrip("\ufffd"))  # not "[2] (notes.md - Pensions)" copied
        score = math.exp(logprob / n) if n else 0.0
        passages = [c.text for c in chunks]
        # the calibrated rule has decided to answer: no phrase, and no empty answer (a model that wrote
        # only a chunk label, "[2] (notes.md)", wrote nothing)
        refused = judged and (not answer or is_no_answer(answer))
        if refused or (answer and not is_no_answer(answer) and (echoes(answer, question) or not grounded(answer, passages))):
            # a question is no answer, nor text the documents do not hold: the best span instead
            self._rewind()
            result = self._extract(question, chunks, last, step0, na_lp, phrase, None, free=False)
            result.extractive, result.margin = False, margin
            if on_text and not result.no_answer:
                on_text(("\n" if shown else "") + result.answer)
            return result
        if not answer or is_no_answer(answer):
            return self._no_answer(question, margin, n)
        command = self._command(question, chunks, answer) if self.concise else None
        if command is not None:
            if on_text and command["text"] not in answer:  # the sentence streamed; the command follows it
                on_text((" " if shown else "") + command["text"])
            return Answer(question, command["text"], False, command, score, generation_tokens=n, margin=margin,
                          sentence=answer)
        short = concise_answer(answer, question, passages) if self.concise else None
        typed = self._typed(question, chunks, short or answer) if self.concise else None
        if typed is not None:  # the span of the kind asked for ("how many": a number), as chosen in answer_type
            if on_text and typed["text"].lower() not in answer.lower():
                on_text((" " if shown else "") + typed["text"])
            return Answer(question, typed["text"], False, typed, score, generation_tokens=n, margin=margin,
                          sentence=answer)
        return Answer(question, short or answer, False, self._evidence(short or answer, chunks), score,
                      generation_tokens=n, margin=margin, sentence=answer if short else None)

    def _extract(self, question, chunks, last, step0, na_lp, phrase, on_text, free: bool = True) -> Answer:
        """The margin decides first. Then (with `free`) the model answers freely: when the documents
        hold its short answer (or its whole answer) word for word, that occurrence is the span.
        Otherwise the best span, by constrained decoding (it may not begin with the no-answer
        phrase's first token)."""
        from .span import SpanConstraint, SpanContext

        texts = [c.text for c in chunks]
        quoted = " ".join(question.split()).lower()  # a span never is the question, where the documents quote it
        quoted = quoted if any(quoted in " ".join(t.split()).lower() for t in texts) else None
        key = (tuple((c.source, c.start, c.end) for c in chunks), quoted)
        if key not in self._span_contexts:
            self._span_contexts = {key: SpanContext(self.tokenizer, texts, exclude=quoted)}
        context = self._span_contexts[key]
        margin = self._margin(step0, context.first_tokens(), na_lp, phrase)
        if self._rejects(margin):
            if on_text:
                on_text(NO_ANSWER)
            return self._no_answer(question, margin)
        said, tokens, found = "", [], None
        if free:
            said, tokens, prefixes = self._free_answer(last, phrase, step0)
            said = strip_labels(said)
            if said and not is_no_answer(said) and not echoes(said, question):
                short = concise_answer(said, question, texts) if self.concise else None
                found = context.find(short) if short else None
                if found is None:
                    whole = context.find(said)  # the model answered with a span: as short as it supports
                    found = self._supported_prefix(said, whole, context, prefixes) if whole else None
        command = self._command(question, chunks, said)
        typed = None
        if command is None and self.concise:  # a question asking for a number, a date or a name
            typed = self._typed(question, chunks, found.text if found is not None else said)
        if command is not None or typed is not None or found is not None:
            # a procedure asked for: the command the passages give for it; a number, date or name
            # asked for: the span of that kind; else the model's own answer
            if command is not None or typed is not None:
                evidence = command or typed
            else:
                evidence = located(chunks[found.chunk], found.start, found.end, found.text)
            lp, n = self._score_text(last, evidence["text"])
            result = Answer(question, evidence["text"], False, evidence, math.exp(lp / n) if n else 0.0,
                            extractive=True, generation_tokens=len(tokens), margin=margin,
                            sentence=said if said and said != evidence["text"] else None)
            if on_text:
                on_text(result.answer)
            return result
        constraint = SpanConstraint(context, self.tokenizer, ban_first=phrase[0])
        kwargs = {k: v for k, v in self.gen_kwargs.items() if k not in ("prompt_lookup", "draft_model", "stop")}
        eos, spelt = None, []
        for r in self._stream(last, [constraint], kwargs):
            if r.token in self.tokenizer.eos_token_ids:
                eos = r.token
            elif r.token >= 0:
                spelt.append(r.token)
        self._rewind()
        span, span_lp, n = shortest_span(context, constraint, spelt, eos, self._score_text, last)
        tokens += spelt
        if span is None:
            result = self._no_answer(question, margin, len(tokens))
        else:
            decoded = span
            span = self._shorter_span(span, question, texts) if self.concise else span
            evidence = located(chunks[span.chunk], span.start, span.end, span.text)
            result = Answer(question, span.text, False, evidence, math.exp(span_lp / n) if n else 0.0,
                            extractive=True, generation_tokens=len(tokens), margin=margin,
                            sentence=decoded.text if span is not decoded else None)
        if on_text:
            on_text(result.answer)
        return result

    def _free_answer(self, last: int, phrase: list[int], step0: mx.array) -> tuple[str, list[int], list[tuple[str, float]]]:
        """The model's unconstrained answer (not beginning with the no-answer phrase's first token),
        its tokens, and for each token the text so far with log P(that text, then the end of the
        answer); the cache is left as it was."""
        text, tokens, steps = "", [], []  # steps: (text after token k, log P(tokens 0..k)), log P dists
        run, dists = 0.0, []
        for r in self._stream(last, [BanFirst(phrase[0])]):
            if r.token < 0:
                continue
            dist = step0 if not tokens else r.logprobs
            dists.append(dist)
            tokens.append(r.token)
            if r.token in self.tokenizer.eos_token_ids:
                break
            run += float(dist[r.token].item())
            text += r.text
            steps.append((text, run))
        self._rewind()
        eos = sorted(self.tokenizer.eos_token_ids)
        prefixes = []
        for k, (upto, lp) in enumerate(steps):
            if k + 1 < len(dists):  # log P(the answer ends here)
                prefixes.append((upto, lp + max(float(dists[k + 1][e].item()) for e in eos)))
        return text.strip().rstrip("\ufffd").strip(), tokens, prefixes

    def _supported_prefix(self, said: str, found, context, prefixes: list[tuple[str, float]]):
        """The shortest prefix of the model's answer `said` (found in the documents as `found`) that
        ends on a word and whose log P(prefix, end) is within SPAN_MARGIN of the best."""
        scored = []
        for upto, lp in prefixes:
            text = upto.strip().rstrip("\ufffd").strip()
            if not text or not said.startswith(text):
                continue
            rest = said[len(text):]
            if rest and text[-1].isalnum() and rest[0].isalnum():  # inside a word
                continue
            span = found if text == said else context.find(text)
            if span is not None:
                scored.append((lp, span))
        if not any(sp is found for _, sp in scored) and prefixes:  # it ended at a stop sequence or the token limit
            scored.append((max(lp for _, lp in prefixes), found))
        if not scored:
            return found
        best = max(lp for lp, _ in scored)
        return min((sp for lp, sp in scored if lp >= best - SPAN_MARGIN), key=lambda sp: len(sp.text))

    @staticmethod
    def _shorter_span(span, question: str, texts: list[str]):
        """The span without what restates the question (concise_answer), still an exact part of it."""
        from .span import Span

        short = concise_answer(span.text, question, texts)
        i = span.text.find(short) if short else -1
        if i < 0:
            return span
        return Span(span.chunk, span.start + i, span.start + i + len(short), short)

    def _score_text(self, last: int, text: str) -> tuple[float, int]:
        """(log P(text + EOS | prompt), tokens) with the cache at the question's last token; the
        cache is left as it was."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        seq = [last] + ids
        logits = self.model(mx.array(seq, dtype=mx.int32)[None], cache=self.cache)[0]  # (len(seq), V)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = ids + ([eos] if eos is not None else [])
        total = float(mx.take_along_axis(lp[: len(targets)], mx.array(targets)[:, None], axis=-1).sum().item())
        self._rewind()
        return total, len(targets)

    # -- evidence for generated answers -------------------------------------------------------------

    def _command(self, question: str, chunks: list[Chunk], said: str) -> dict | None:
        """For a question asking how to do something, the evidence of the command (a code span of
        the passages) that answers it, or None (see concise.command_answer)."""
        found = command_answer(question, [c.text for c in chunks], said)
        if found is None:
            return None
        i, a, b = found
        return located(chunks[i], a, b, chunks[i].text[a:b])

    def _typed(self, question: str, chunks: list[Chunk], said: str) -> dict | None:
        """For a question asking for a quantity, a date or a name, the evidence of the span of that
        kind that answers it, or None (see answer_type.typed_answer); `said` is the model's answer."""
        found = typed_answer(question, [c.text for c in chunks], said)
        if found is None:
            return None
        return located(chunks[found.passage], found.start, found.end, found.text)

    def _evidence(self, answer: str, chunks: list[Chunk]) -> dict | None:
        """Where a generated answer is found in the passages: verbatim if possible, else the sentence
        sharing the most words with it."""
        needle = answer.strip().rstrip(".。").strip()
        for chunk in chunks:
            i = chunk.text.lower().find(needle.lower()) if needle else -1
            if i >= 0:
                return located(chunk, i, i + len(needle), chunk.text[i : i + len(needle)])
        from .metrics import f1_score

        best, best_f1 = None, 0.0
        for chunk in chunks:
            for m in _SENTENCE.finditer(chunk.text):
                f1 = f1_score(m.group(), answer)
                if f1 > best_f1:
                    lead = len(m.group()) - len(m.group().lstrip())
                    text = m.group().strip()
                    start = m.start() + lead
                    best, best_f1 = located(chunk, start, start + len(text), text), f1
        return best


def echoes(answer: str, question: str) -> bool:
    """Whether a generated answer repeats the question instead of answering it."""
    from .metrics import f1_score, normalize_answer

    a, q = normalize_answer(answer), normalize_answer(question)
    if not a:
        return False
    if re.match(r"\s*(question|q)\s*[:：]", answer, re.IGNORECASE):  # a new question turn, not an answer
        return True
    return a == q or (answer.rstrip().endswith(("?", "？")) and f1_score(answer, question) >= 0.5) \
        or (len(a) > 12 and a in q)


def cite(evidence: dict, chunks: list[Chunk]) -> list[dict]:
    """The chunks (numbered from 1 as in the prompt) that hold the evidence, with its section."""
    out = []
    for n, c in enumerate(chunks, 1):
        if c.source == evidence["source"] and c.start <= evidence["start"] and evidence["end"] <= c.end:
            heading = heading_at(c.text, evidence["start"] - c.start) or c.heading
            if c.heading and heading != c.heading and not heading.startswith(c.heading):
                heading = c.heading
            out.append({"n": n, "source": c.source, "start": c.start, "end": c.end, "heading": heading})
    return out


def shortest_span(context, constraint, tokens: list[int], eos: int | None, score_text, last: int):
    """The shortest span the model supports: the decoded span, its prefixes ending on a word
    boundary (scored from the decoding's own log-probabilities: log P(prefix) + log P(EOS next))
    and the best of those without up to three leading function words (one short pass each);
    the shortest whose log P(span + EOS) is within SPAN_MARGIN of the best. Returns (Span or None,
    log-probability, tokens scored)."""
    token_bytes = constraint.token_bytes
    candidates = []  # (logprob, n tokens, bytes)
    run, data = 0.0, b""
    for k, t in enumerate(tokens):
        run += constraint.raw_logprob(k, t)
        data += token_bytes(t)
        if k + 1 < len(constraint.raw_logprobs) and data.strip() and context.locate(data, ends=True):
            end_lp = max(constraint.raw_logprob(k + 1, e) for e in constraint.eos_ids)
            candidates.append((run + end_lp, k + 2, data))
    if not candidates:
        span = context.locate(data) if data else None
        return span, run, len(tokens)
    best = max(c[0] for c in candidates)
    lp, n, data = min((c for c in candidates if c[0] >= best - SPAN_MARGIN), key=lambda c: (len(c[2].strip()), -c[0]))
    span = context.locate(data)
    from bm25s.stopwords import STOPWORDS_EN_PLUS as STOPWORDS_EN

    words = span.text.split(" ")
    for drop in range(1, min(3, len(words) - 1) + 1):  # leading function words: "in 1889" -> "1889"
        if words[drop - 1].lower() not in STOPWORDS_EN:
            break
        shorter = " ".join(words[drop:])
        found = context.locate(shorter.encode("utf-8"), ends=True)
        if found is None:
            continue
        s_lp, s_n = score_text(last, shorter)
        if s_lp >= lp - SPAN_MARGIN:
            span, lp, n = found, s_lp, s_n
    return span, lp, n


def _mask(size: int, ids) -> mx.array:
    mask = mx.zeros((size,), dtype=mx.bool_)
    ids = [i for i in ids if i < size]
    return mask if not ids else mx.put_along_axis(mask, mx.array(ids), mx.array(True), axis=0)


class BanFirst:
    """A logits processor that forbids one token as the answer's first (the no-answer phrase's), so
    the answer generated is the model's best real answer; the phrase is scored separately."""

    def __init__(self, token: int):
        self.token, self.first_len = token, None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.first_len is None:
            self.first_len = tokens.size
        if tokens.size != self.first_len:
            return logits
        return mx.where(_mask(logits.shape[-1], [self.token]), -mx.inf, logits)


def answer(model, tokenizer, question: str, context: ContextLike, **kwargs) -> Answer:
    """Answers `question` from `context` (a string, a list of strings or Documents, or
    {source: text}). Keyword arguments: extractive, max_context, whole, max_tokens, top_chunks,
    chunk_tokens, rerank, no_answer_threshold, progress, and stream_generate's sampling options."""
    return QASession(model, tokenizer, context, **kwargs).ask(question)
