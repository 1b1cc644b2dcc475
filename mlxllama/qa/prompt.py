"""The QA prompt, laid out so the documents come before the question (their KV cache is reusable),
and the fixed phrase a model says when the context does not hold the answer."""

from __future__ import annotations

import re

from .retrieve import Chunk

NO_ANSWER = "The answer is not in the context."
SYSTEM = (
    "You answer questions using only the context. Reply with the shortest answer, copied word for "
    f'word from the context. If the context does not contain the answer, reply exactly: "{NO_ANSWER}"'
)
# A worked example before the user's documents: it shows the answer style (a short span) and the
# no-answer phrase, which even a 135M model then follows. It sits in the cached part of the prompt.
EXAMPLE_CONTEXT = "The Eiffel Tower in Paris was completed in 1889. It is 330 metres tall."
EXAMPLE_TURNS = [
    ("When was the Eiffel Tower completed?", "1889"),
    ("Who painted the Eiffel Tower?", NO_ANSWER),
    ("How tall is the Eiffel Tower?", "330 metres"),
]
_QUESTION_MARK = "\x00QUESTION\x00"
# variants small models produce instead of the exact phrase
_NO_ANSWER_PATTERNS = re.compile(
    r"(answer is not (in|found in|provided in|given in|mentioned in) the (context|text)"
    r"|(context|text) does not (contain|mention|provide|say|specify|state|include)"
    r"|not (explicitly |directly |clearly )?(mentioned|provided|stated|specified|given|found) in the (context|text)"
    r"|^(this|the) question is not (answered )?in the (context|text)"
    r"|^this is a question that is not answered"
    r"|答案不在上下文中)",
    re.IGNORECASE,
)


def is_no_answer(text: str) -> bool:
    """Whether a generated answer is (a variant of) the no-answer phrase."""
    return bool(_NO_ANSWER_PATTERNS.search(" ".join(text.split())))


# what the prompt puts before a chunk ("[3] (handbook.md - Pensions)") and a Markdown heading's marks:
# a small model sometimes copies them at the start of its answer
_LABEL = re.compile(r"^(?:\s*(?:\[\d+\]|\((?:[^()\n]*)\)(?=\s*(?:\n|#|\[|$))|#{1,6}[ \t][^\n]*\n|#{1,6}(?=\s)))+\s*")


def strip_labels(answer: str) -> str:
    """The answer without the chunk numbers, chunk labels and heading marks it starts with."""
    return _LABEL.sub("", answer, count=1).strip()


def label(chunk: Chunk) -> str:
    """How the prompt and a citation name a chunk: its source and the section it is under."""
    return f"{chunk.source} - {chunk.heading}" if chunk.heading else chunk.source


def context_block(chunks: list[Chunk]) -> str:
    """The documents as the prompt shows them; several chunks are numbered and name their source."""
    if len(chunks) == 1:
        return chunks[0].text.strip()
    parts = [f"[{i}] ({label(c)})\n{c.text.strip()}" for i, c in enumerate(chunks, 1)]
    return "\n\n".join(parts)


def prompt_parts(tokenizer, chunks: list[Chunk]) -> tuple[str, str]:
    """(text before the question, text after it). The first part holds the instructions, the worked
    example and the documents, so its tokens, and their KV cache, are the same for every question."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, (question, answer) in enumerate(EXAMPLE_TURNS):
        context = f"Context:\n{EXAMPLE_CONTEXT}\n\n" if i == 0 else ""
        messages += [{"role": "user", "content": f"{context}Question: {question}"},
                     {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": f"Context:\n{context_block(chunks)}\n\nQuestion: {_QUESTION_MARK}"})
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template without a system role: the instructions go first in the user turn
        messages[1]["content"] = f"{SYSTEM}\n\n{messages[1]['content']}"
        rendered = tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)
    before, _, after = rendered.partition(_QUESTION_MARK)
    return before, after


def encode_parts(tokenizer, before: str, question: str, after: str) -> tuple[list[int], list[int]]:
    """(document tokens, question tokens). The two are encoded apart so the document's tokens never
    depend on the question; the space before the question goes with the question, as BPE has it."""
    stripped = before.rstrip(" ")
    space = before[len(stripped):]
    if getattr(getattr(tokenizer, "_backend", None), "strips_leading_space", False):
        space = ""  # sentencepiece adds its own word-start space to the question
    doc = tokenizer.encode(stripped, add_special_tokens=not tokenizer.has_chat_template)
    tail = tokenizer.encode(space + " ".join(question.split()) + after, add_special_tokens=False)
    return doc, tail
