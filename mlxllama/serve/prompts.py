"""A checked request -> token ids and generation settings for the engine."""

from __future__ import annotations

import dataclasses

from ..errors import GrammarError, MlxllamaError
from ..generate import context_length
from .engine import GenRequest
from .schemas import APIError, Parsed, bad, format_field


def chat_tokens(parsed: Parsed, tokenizer) -> list[int]:
    """The conversation through the chat template; tools (unless tool_choice is none) go with it."""
    from ..tools import template_messages

    tools = parsed.tools if parsed.tool_choice != "none" else None
    messages, extra = template_messages(parsed.messages, tools, tokenizer)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra))


def output_constraint(parsed: Parsed, tokenizer):
    """The Constraint for a request's response_format or tool calls, or None; 400 on a bad one."""
    from ..constrain import Constraint, constraint_for, lark
    from ..tools import call_grammar, detect_format

    try:
        if parsed.tools and parsed.tool_choice != "none":
            choice = parsed.tool_choice
            tools = parsed.tools
            if isinstance(choice, dict):
                tools = [t for t in tools if t["function"]["name"] == choice["name"]]
            grammar = call_grammar(tools, detect_format(tokenizer), tokenizer, required=choice != "auto",
                                   parallel=parsed.parallel_tool_calls)
            return Constraint(lark(grammar), tokenizer)
        return constraint_for(tokenizer, parsed.response_format)
    except GrammarError as e:
        raise bad("tools" if parsed.tools and parsed.tool_choice != "none" else format_field(parsed), str(e)) from None


def prompt_tokens(parsed: Parsed, tokenizer, vocab_size: int) -> list[int]:
    if parsed.kind == "chat":
        try:
            tokens = chat_tokens(parsed, tokenizer)
        except MlxllamaError as e:  # the template rejected the conversation (raise_exception)
            raise bad("messages", str(e)) from None
    elif isinstance(parsed.prompt, str):
        if not parsed.prompt:
            raise bad("prompt", "'prompt' is empty")
        tokens = tokenizer.encode(parsed.prompt)
    else:
        tokens = list(parsed.prompt)
        wrong = next((t for t in tokens if not 0 <= t < vocab_size), None)
        if wrong is not None:
            raise bad("prompt", f"token id {wrong} is outside the vocabulary (0 to {vocab_size - 1})")
    if not tokens:
        raise bad("messages" if parsed.kind == "chat" else "prompt", "the prompt is empty")
    return tokens


def gen_request(parsed: Parsed, tokenizer, model, default_max_tokens: int, default_temperature: float = 1.0) -> GenRequest:
    """Token ids plus sampling settings; max_tokens is cut to what the context has room for."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", None) or len(tokenizer)
    tokens = prompt_tokens(parsed, tokenizer, vocab)
    limit = context_length(model)
    max_tokens = parsed.max_tokens if parsed.max_tokens is not None else default_max_tokens
    if max_tokens == -1:  # llama.cpp's n_predict -1: until the end of sequence or of the context
        max_tokens = limit - len(tokens) if limit else 1 << 30
        if max_tokens <= 0:
            max_tokens = 1  # refused below, with the context message
        parsed = dataclasses.replace(parsed, max_tokens=None)
    if limit:
        room = limit - len(tokens)
        if room <= 0 or (parsed.max_tokens is not None and parsed.max_tokens > room):
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                           f"{len(tokens)} tokens and {max_tokens} more were requested",
                           param="messages" if parsed.kind == "chat" else "prompt",
                           code="context_length_exceeded")
        max_tokens = min(max_tokens, room)
    if parsed.logit_bias:
        wrong = next((t for t in parsed.logit_bias if not 0 <= t < vocab), None)
        if wrong is not None:
            raise bad("logit_bias", f"token id {wrong} is outside the vocabulary (0 to {vocab - 1})")
    bias = parsed.logit_bias
    if parsed.ignore_eos:  # as llama.cpp does it: end-of-sequence tokens can never be sampled
        bias = {**(bias or {}), **{t: -float("inf") for t in tokenizer.eos_token_ids}}
    return GenRequest(
        prompt=tokens,
        max_tokens=max_tokens,
        temperature=parsed.temperature if parsed.temperature is not None else default_temperature,
        top_p=parsed.top_p,
        seed=parsed.seed,
        stop=parsed.stop,
        logprobs=parsed.logprobs,
        logit_bias=bias,
        top_k=parsed.top_k,
        min_p=parsed.min_p,
        repetition_penalty=parsed.repetition_penalty,
        repetition_context_size=parsed.repetition_context_size,
        presence_penalty=parsed.presence_penalty,
        frequency_penalty=parsed.frequency_penalty,
        constraint=output_constraint(parsed, tokenizer),
    )


def choices(request: GenRequest, n: int) -> list[GenRequest]:
    """n independent choices of one request; with a seed, choice i samples with seed + i, so each
    choice is reproducible and choice 0 is what n=1 gives."""
    if n == 1:
        return [request]
    return [dataclasses.replace(request, seed=None if request.seed is None else (request.seed + i) % (1 << 64))
            for i in range(n)]
