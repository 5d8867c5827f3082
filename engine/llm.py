"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, SamplingParams)`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.loader import resolve_source
from engine.output_processor import RequestTextStream
from engine.request import InvalidRequestError, PromptLogprob, SamplingParams
from engine.tokenizer import Tokenizer

Prompt = str | list[int] | dict[str, Any]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    prompt_logprobs: list[PromptLogprob | None] | None = None  # params.prompt_logprobs (None for the first token)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching."""

    def __init__(self, model: str = "smollm2", *, load_format: str = "auto", dtype: str = "float32",
                 device: str = "cpu", max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 block_size: int = 16, num_blocks: int | None = None, kv_cache_memory: int = 512 * 2**20,
                 max_model_len: int | None = None, seed: int = 0, tensor_parallel_size: int = 1,
                 **kwargs: Any) -> None:
        """`tensor_parallel_size` N > 1 splits the model over N ranks: this process and N - 1 it starts (on GPUs
        0..N-1 from `device`, or the CPU); `close()` stops them."""
        self.config = EngineConfig(
            model=model, load_format=load_format, dtype=dtype, device=device, max_model_len=max_model_len, seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, memory_budget_bytes=kv_cache_memory),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
            **kwargs,
        )
        self.engine = LLMEngine(self.config)
        fmt, path = resolve_source(model, load_format)
        self.tokenizer: Tokenizer | None = Tokenizer.from_model_path(path) if fmt != "dummy" else None
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's other tensor-parallel ranks (nothing to stop with one)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chat(self, conversations: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        tok = self._need_tokenizer()
        convs = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion (together, continuously batched); outputs in input order."""
        plist = [prompts] if isinstance(prompts, str | dict) or _is_token_list(prompts) else list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(plist)
        if len(params) != len(plist):
            raise InvalidRequestError(f"{len(plist)} prompts but {len(params)} sampling params")
        encoded = [self._encode(p) for p in plist]
        for ids, sp in zip(encoded, params, strict=True):
            self.engine.validate(ids, sp)  # all-or-nothing: reject before anything starts
        outs = self._run(plist, encoded, params, use_tqdm)
        return outs

    def _run(self, plist: list[Prompt], encoded: list[list[int]], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        order, outs, streams = {}, {}, {}
        for i, (p, ids, sp) in enumerate(zip(plist, encoded, params, strict=True)):
            rid = str(next(self._ids))
            self.engine.add_request(rid, ids, sp)
            order[rid] = i
            outs[rid] = RequestOutput(rid, p if isinstance(p, str) else None, ids,
                                      [CompletionOutput(0, "", [], None, logprobs=[] if sp.logprobs is not None else None)])
            if self.tokenizer is not None:
                streams[rid] = RequestTextStream(self.tokenizer, ids, sp.stop, sp.skip_special_tokens)
        bar = tqdm(total=len(plist), desc="Generating", disable=not use_tqdm)
        while self.engine.has_unfinished():
            for so in self.engine.step():
                if so.prompt_logprobs is not None:
                    outs[so.request_id].prompt_logprobs = so.prompt_logprobs
                self._apply(outs[so.request_id].outputs[0], so, streams.get(so.request_id), bar)
        bar.close()
        return sorted(outs.values(), key=lambda o: order[o.request_id])

    def _apply(self, c: CompletionOutput, so: Any, stream: RequestTextStream | None, bar: tqdm) -> None:
        if c.finish_reason is not None:
            return
        c.token_ids.extend(so.new_token_ids)
        if c.logprobs is not None:
            c.logprobs.extend(so.new_logprobs)
        finish, stop_reason = (so.finish_reason, so.stop_reason) if so.finished else (None, None)
        if stream is not None:
            delta = stream.push(so.new_token_ids, final=so.finished)
            c.text += delta.text
            if delta.stopped:
                if not so.finished:
                    self.engine.abort(so.request_id)
                finish, stop_reason = "stop", delta.stop_string
        if finish is not None:
            c.finish_reason, c.stop_reason = finish, stop_reason
            bar.update(1)

    def _encode(self, p: Prompt) -> list[int]:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                return list(p["prompt_token_ids"])
            p = p.get("prompt", "")
        if isinstance(p, str):
            return self._need_tokenizer().encode(p) if p else []
        return list(p)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer (dummy weights): pass token ids")
        return self.tokenizer


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], int)
