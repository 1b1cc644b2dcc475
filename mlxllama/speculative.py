"""Speculative decoding: draft a few tokens cheaply, check them with one forward pass of the model.

Drafts come from prompt lookup (what followed the latest earlier occurrence of the text's last
n-gram: answers and summaries copy their context) or from a small draft model with the same
vocabulary. One forward pass of the model over [pending token, d1..dk] gives its distribution at
every drafted position. Verification walks the drafts left to right:

  * the model samples its own token t_i at position i (greedy: the argmax); while t_i == d_i the
    draft is accepted, the first mismatch emits t_i and ends the round, and when all k drafts pass
    the token after them comes free. With greedy sampling the output is exactly plain greedy
    decoding. For prompt-lookup drafts (a point mass q) this *is* rejection sampling: d_i is kept
    with probability p(d_i), and a rejected position draws from p without d_i, i.e. the
    normalised max(0, p - q).
  * for a sampling draft model whose sampler exposes `distribution` (logprobs -> the logits it
    samples from), proper rejection sampling: keep d_i with probability min(1, p(d_i)/q(d_i)),
    else draw from the normalised max(0, p - q). Samplers without it use the comparison above,
    which also leaves the output distribution exactly p (it accepts less often).

Rejected positions are dropped from the KV caches with `trim`. Every yielded token carries
`from_draft`: whether it was a drafted token that the model accepted.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import mlx.core as mx

from .errors import InputError
from .prefill import prefill
from .models import make_cache
from .sample import Processor, Sampler, make_sampler

DEFAULT_DRAFT_TOKENS = 3  # for a draft model (mlx-lm's default too)
NGRAM_MAX, NGRAM_MIN = 3, 1


class PromptLookup:
    """An n-gram index over the text so far: `draft(k)` returns what followed the most recent
    earlier occurrence of the longest suffix n-gram (n = NGRAM_MAX .. NGRAM_MIN), up to k tokens."""

    def __init__(self, tokens: list[int] = (), ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.tokens: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(ngram_min, ngram_max + 1)}
        self.extend(tokens)

    def extend(self, tokens) -> None:
        for t in tokens:
            j = len(self.tokens) - 1  # the current last position becomes an "earlier" occurrence
            for n in range(self.ngram_min, self.ngram_max + 1):
                if j - n + 1 >= 0:
                    self.index[n][tuple(self.tokens[j - n + 1 : j + 1])] = j
            self.tokens.append(int(t))

    def draft(self, k: int) -> list[int]:
        L = len(self.tokens)
        if k <= 0:
            return []
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            if L < n:
                continue
            j = self.index[n].get(tuple(self.tokens[L - n :]))
            if j is not None:
                # a unigram match is a weak hint: draft less from it
                return self.tokens[j + 1 : j + 1 + (k if n > 1 else min(k, 2))]
        return []


def sampling_distribution(sampler: Sampler) -> Callable[[mx.array], mx.array] | None:
    """The sampler's `distribution` (logprobs (B, V) -> logits it samples from), if it has one."""
    return getattr(sampler, "distribution", None)


def can_rewind(cache: list, n: int) -> bool:
    """Whether n positions written next can be trimmed again (a rotating cache only until it wraps)."""
    for c in cache:
        if not c.is_trimmable():
            return False
        max_size = getattr(c, "max_size", None)
        if max_size is not None and c.offset + n >= max_size:
            return False
    return True


def trim(cache: list, n: int) -> None:
    if n > 0:
        for c in cache:
            c.trim(n)


def split_cache(prompt_cache: list | None, model, draft_model) -> tuple[list | None, list | None]:
    """mlx-lm's convention: a prompt cache for speculative decoding holds the model's layers then
    the draft model's. A cache with only the model's layers gets a fresh draft cache (the draft then
    sees only the new tokens: slower drafts, same output)."""
    if prompt_cache is None or draft_model is None:
        return prompt_cache, None
    n = len(model.layers)
    if len(prompt_cache) == n + len(draft_model.layers):
        return prompt_cache[:n], prompt_cache[n:]
    return prompt_cache, None


def check_draft_model(model, draft_model) -> None:
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    draft_vocab = getattr(getattr(draft_model, "args", None), "vocab_size", None)
    if vocab is not None and draft_vocab is not None and vocab != draft_vocab:
        raise InputError(f"the draft model's vocabulary ({draft_vocab} tokens) differs from the model's ({vocab})")


def process(logits: mx.array, history: list[int], drafts: list[int], processors: list[Processor]) -> mx.array:
    """Applies logits processors row by row: row i follows history + drafts[:i]. logits (R, V)."""
    if not processors:
        return logits
    rows = []
    for i in range(logits.shape[0]):
        tokens = mx.array(history + drafts[:i], dtype=mx.int32)
        row = logits[i : i + 1]
        for p in processors:
            row = p(tokens, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def log_normalize(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class DraftModel:
    """Keeps a draft model's cache a prefix of the text: `pending` is what it has not seen yet."""

    def __init__(self, model, cache: list, prompt: list[int], sampler: Sampler, processors: list[Processor],
                 prefill_step_size: int):
        self.model, self.cache, self.sampler, self.processors = model, cache, sampler, processors
        self.pending = list(prompt)
        self.step_size = prefill_step_size

    def draft(self, k: int, history: list[int]) -> tuple[list[int], mx.array | None]:
        """k tokens and their draft logprobs (k, V) after the processors; the cache then holds the
        text plus d1..d(k-1)."""
        tokens, rows = [], []
        y = prefill(self.model, mx.array(self.pending, dtype=mx.int32), self.cache, self.step_size)
        self.pending = []
        for i in range(k):
            logits = self.model(y[None], cache=self.cache)[0, -1:, :]  # (1, V)
            lp = log_normalize(process(logits, history + tokens, [], self.processors))
            t = self.sampler(lp)  # (1,)
            tokens.append(t.item())
            rows.append(lp)
            y = t
        return tokens, mx.concatenate(rows, axis=0) if rows else None

    def accept(self, k: int, accepted: list[int]) -> None:
        """After verification: `accepted` are the tokens that extend the text this round (the
        accepted drafts and the model's own token)."""
        n_ok = len(accepted) - 1  # accepted drafts
        kept = min(n_ok, k - 1)  # drafted tokens the cache holds and may keep
        trim(self.cache, (k - 1) - kept if k > 0 else 0)
        self.pending = accepted[kept:]

    def skip(self, accepted: list[int]) -> None:
        """A round drafted by prompt lookup: the draft model just has more text to catch up on."""
        self.pending += accepted


def verify(p_logprobs: mx.array, drafts: list[int], q_logprobs: mx.array | None, sampler: Sampler,
           distribution) -> list[int]:
    """Returns the tokens this round emits: accepted drafts, then one token from the model.
    p_logprobs (k+1, V) from the model; q_logprobs (k, V) from a draft model or None (point mass)."""
    k = len(drafts)
    if q_logprobs is None or distribution is None or k == 0:
        targets = sampler(p_logprobs).tolist()  # (k+1,)
        out = []
        for i, d in enumerate(drafts):
            if targets[i] != d:
                break
            out.append(d)
        out.append(targets[len(out)])
        return out
    p = mx.softmax(distribution(p_logprobs).astype(mx.float32), axis=-1)  # (k+1, V)
    q = mx.softmax(distribution(q_logprobs).astype(mx.float32), axis=-1)  # (k, V)
    idx = mx.array(drafts)[:, None]
    pd = mx.take_along_axis(p[:k], idx, axis=-1)[:, 0]  # (k,)
    qd = mx.take_along_axis(q, idx, axis=-1)[:, 0]
    u = mx.random.uniform(shape=(k,))
    accept = (u * qd < pd).tolist()  # u < p/q without dividing by zero
    out = []
    for i, d in enumerate(drafts):
        if not accept[i]:
            residual = mx.maximum(p[i] - q[i], 0.0)
            if residual.sum().item() <= 0:  # only by rounding: p == q here
                residual = p[i]
            out.append(mx.random.categorical(mx.log(residual)).item())
            return out
        out.append(d)
    out.append(sampler(p_logprobs[k:]).item())
    return out


def speculative_generate_step(
    prompt: mx.array,
    model,
    *,
    draft_model=None,
    prompt_lookup: int = 0,
    num_draft_tokens: int | None = None,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[Processor] | None = None,
    max_kv_size: int | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
    lookup_context: Sequence[int] | None = None,
) -> Iterator[tuple[int, mx.array, bool]]:
    """Yields (token, logprobs (V,), from_draft). prompt_lookup=N drafts up to N tokens from n-grams
    of the text (lookup_context, e.g. what prompt_cache holds, then the prompt and the output);
    draft_model drafts num_draft_tokens (default 3) where prompt lookup finds nothing.
    When the generator is closed early, the model's cache is trimmed to the prompt and the tokens
    handed out, as with plain decoding."""
    if draft_model is None and prompt_lookup <= 0:
        raise ValueError("speculative decoding needs a draft model or prompt_lookup > 0")
    if draft_model is not None:
        check_draft_model(model, draft_model)
    sampler = sampler or make_sampler()
    processors = logits_processors or []
    distribution = sampling_distribution(sampler)
    n_lookup = max(0, prompt_lookup)
    n_model = num_draft_tokens if num_draft_tokens is not None else (DEFAULT_DRAFT_TOKENS if not n_lookup else n_lookup)

    cache, draft_cache = split_cache(prompt_cache, model, draft_model)
    cache = cache if cache is not None else make_cache(model, max_kv_size)
    prompt_list = prompt.astype(mx.int32).tolist()
    drafter = None
    if draft_model is not None:
        draft_cache = draft_cache if draft_cache is not None else make_cache(draft_model, max_kv_size)
        drafter = DraftModel(draft_model, draft_cache, prompt_list, sampler, processors, prefill_step_size)
    lookup = PromptLookup([*(lookup_context or ()), *prompt_list]) if n_lookup else None

    # The model's cache holds history[:len(history) - len(pending)]; pending is fed next.
    history = list(prompt_list)
    start = cache[0].offset if cache else 0
    pending = prefill(model, mx.array(prompt_list, dtype=mx.int32), cache, prefill_step_size).tolist()  # 1 token
    n = 0
    try:
        while n < max_tokens:
            room = max_tokens - n - 1  # a round emits at most k + 1 tokens
            drafts, q_lp, by_model = [], None, False
            if room > 0:
                if lookup is not None and can_rewind(cache, len(pending) + n_lookup):
                    drafts = lookup.draft(min(n_lookup, room))
                if not drafts and drafter is not None and n_model > 0 and can_rewind(cache, len(pending) + n_model) \
                        and can_rewind(drafter.cache, len(drafter.pending) + n_model):
                    k = min(n_model, room)
                    drafts, q_lp = drafter.draft(k, history)
                    by_model = True
            k = len(drafts)
            logits = model(mx.array(pending + drafts, dtype=mx.int32)[None], cache=cache)[0, -(k + 1):, :]
            p_lp = log_normalize(process(logits, history, drafts, processors))  # (k+1, V)
            emitted = verify(p_lp, drafts, q_lp if by_model else None, sampler, distribution)
            n_ok = len(emitted) - 1
            trim(cache, k - n_ok)
            if drafter is not None:
                drafter.accept(k, emitted) if by_model else drafter.skip(emitted)
            history += emitted
            if lookup is not None:
                lookup.extend(emitted)
            pending = emitted[-1:]
            for i, t in enumerate(emitted):
                yield t, p_lp[i], i < n_ok
                n += 1
                if n == max_tokens:
                    break
    finally:
        # keep in the cache no more than the prompt and the tokens handed out
        held = cache[0].offset - start if cache else 0
        given = len(prompt_list) + n
        if held > given:
            trim(cache, held - given)
