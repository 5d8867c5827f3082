"""An OpenAI request's sampling fields -> checked `SamplingParams` (one per choice), and its text options.

Fields the HTTP request carries under a `SamplingParams` name are copied by name; the others are derived here:
max_tokens and logprobs (endpoint-specific), stop and stop_token_ids, logit_bias (string keys, values clamped to
[-100, 100] as vLLM does), bad_words (tokenized as vLLM does, with and without a leading space), the grammar.
Every problem is a 400 naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields

from engine.request import InvalidRequestError, SamplingParams
from engine.tokenizer import Tokenizer
from router.errors import bad_request
from router.protocol import ChatCompletionRequest, GenerationRequest
from router.text import TextOptions

# SamplingParams fields an OpenAI request carries under the same name are copied by name; these are derived.
_DERIVED = frozenset({"max_tokens", "logprobs", "stop", "stop_token_ids", "logit_bias", "bad_words_ids",
                      "allowed_token_ids", "structured_output", "fork_from"})
# Longest first, so an engine error message is attributed to the most specific field it starts with.
_PARAM_NAMES = sorted((f.name for f in fields(SamplingParams)), key=len, reverse=True)


def checked_ids(tokenizer: Tokenizer, ids: list[int], param: str) -> list[int]:
    vocab = tokenizer.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise bad_request(f"{param} holds token ids outside the vocabulary (size {vocab}): {bad[:5]}", param=param)
    return ids


def _logit_bias(req: GenerationRequest, tokenizer: Tokenizer) -> tuple[tuple[int, float], ...]:
    out = []
    for key, bias in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        out.append((checked_ids(tokenizer, [token], "logit_bias")[0], max(-100.0, min(100.0, bias))))
    return tuple(out)


def _bad_words(req: GenerationRequest, tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """Each word's tokens, and its tokens after a space when that spelling starts differently but is as long
    (vLLM's rule), without duplicates."""
    out: list[tuple[int, ...]] = []
    for word in req.bad_words or ():
        if not word.strip():
            raise bad_request("bad_words must not hold empty words", param="bad_words")
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        out.append(plain)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    return tuple(dict.fromkeys(out))


def _allowed(req: GenerationRequest, tokenizer: Tokenizer) -> tuple[int, ...]:
    if req.allowed_token_ids is None:
        return ()
    if not req.allowed_token_ids:
        raise bad_request("allowed_token_ids must not be empty", param="allowed_token_ids")
    return tuple(checked_ids(tokenizer, list(req.allowed_token_ids), "allowed_token_ids"))


def sampling_params(req: GenerationRequest, tokenizer: Tokenizer, max_tokens: int, logprobs: int | None,
                    grammar: str) -> SamplingParams:
    """The request's engine parameters (for its first choice: `for_choice` derives the others)."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    stop_ids = tuple(checked_ids(tokenizer, list(req.stop_token_ids or ()), "stop_token_ids"))
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise bad_request("seed must fit in a signed 64-bit integer", param="seed")
    given = {name: value for name in _PARAM_NAMES
             if name not in _DERIVED and (value := getattr(req, name, None)) is not None}
    try:
        return SamplingParams(**given, max_tokens=max_tokens, stop_token_ids=stop_ids, stop=stop, logprobs=logprobs,
                              logit_bias=_logit_bias(req, tokenizer), bad_words_ids=_bad_words(req, tokenizer),
                              allowed_token_ids=_allowed(req, tokenizer), structured_output=grammar)
    except InvalidRequestError as e:
        param = next((f for f in _PARAM_NAMES if str(e).startswith(f)), None)
        if param == "logprobs" and isinstance(req, ChatCompletionRequest):
            param = "top_logprobs"
        raise bad_request(str(e), param=param) from None


def for_choice(params: SamplingParams, index: int, leader_id: str | None) -> SamplingParams:
    """Choice `index`'s parameters: seed + index (vLLM's rule, so choices differ and each is reproducible), and
    the first choice's request id to fork its prompt KV from."""
    if index == 0:
        return params
    seed = None if params.seed is None else (params.seed + index + 2**63) % 2**64 - 2**63
    return dataclasses.replace(params, seed=seed, fork_from=leader_id or "")


def text_options(req: GenerationRequest, params: SamplingParams) -> TextOptions:
    return TextOptions(stop=params.stop, stop_token_ids=params.stop_token_ids,
                       skip_special_tokens=req.skip_special_tokens is not False,
                       spaces_between_special_tokens=req.spaces_between_special_tokens is not False,
                       include_stop_str_in_output=bool(req.include_stop_str_in_output), min_tokens=params.min_tokens)
