"""Request fields other servers and API versions add: what this server does with each.

Clients written for llama.cpp, vLLM or newer OpenAI models send fields of their own. A field that
cannot change the output is accepted and ignored (`NO_OPS`); a field that would change the output
and that this server does not implement is refused with a 400 naming it, unless it holds its
neutral value (`REFUSED`): a client must never get unconstrained text with a 200 where it asked for
something else. Fields that are implemented are read in schemas.py.
"""

from __future__ import annotations

from typing import Any

# Accepted and ignored: they change how a server schedules or reports, not what it generates.
NO_OPS = {
    "cache_prompt": "llama.cpp: reuse of the KV cache between requests (decided by the server here)",
    "id_slot": "llama.cpp: which slot serves the request (one engine serves all requests here)",
    "n_keep": "llama.cpp: tokens kept when the context shifts (the context never shifts here; "
              "a prompt that does not fit is refused)",
    "return_tokens": "llama.cpp: token ids in the response",
    "timings_per_token": "llama.cpp: timings in the response",
    "response_fields": "llama.cpp: which fields the response carries",
    "user": "OpenAI: an end-user id",
    "metadata": "OpenAI: stored-completion tags",
    "store": "OpenAI: store the completion",
    "service_tier": "OpenAI: processing tier",
    "parallel_tool_calls": "OpenAI: several tool calls at once",
    "prediction": "OpenAI: predicted output, a speed hint",
    "reasoning_effort": "OpenAI: reasoning models only",
    "verbosity": "OpenAI: reasoning models only",
    "skip_special_tokens": "vLLM: special tokens are never shown here",
}

# Refused unless the value is one of the neutral ones (None always is).
REFUSED: dict[str, tuple[Any, ...]] = {
    "mirostat": (0,),
    "typical_p": (1, 1.0),
    "tfs_z": (1, 1.0),
    "top_n_sigma": (-1, -1.0, 0),
    "dynatemp_range": (0, 0.0),
    "dry_multiplier": (0, 0.0),
    "xtc_probability": (0, 0.0),
    "n_probs": (0,),
    "min_keep": (0,),
    "n_indent": (0,),
    "t_max_predict_ms": (0,),
    "post_sampling_probs": (False,),
    "samplers": (),
    "lora": ([],),
    "image_data": ([],),
    "min_tokens": (0,),
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "stop_token_ids": ([],),
    "bad_words": ([],),
    "prompt_logprobs": (),
    "include_stop_str_in_output": (False,),
    "truncate_prompt_tokens": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "modalities": (["text"],),
    "audio": (),
    "web_search_options": (),
}

# llama.cpp's structured-output fields: enforced with the grammar engine, like response_format.
GRAMMAR_FIELDS = ("json_schema", "grammar")


def refused_field(body: dict[str, Any]) -> str | None:
    """The first field of `body` this server would have to ignore to answer, if any."""
    for name, neutral in REFUSED.items():
        v = body.get(name)
        if v is not None and not any(v == n and type(v) is not bool or v is n for n in neutral):
            return name
    return None
