"""Compiling grammars against the model's tokenizer: once per wire spec (LRU), off the caller's thread.

The first grammar loads the tokenizer (seconds for a GGUF file) and builds xgrammar's token tables; later ones
take milliseconds, and a spec seen before none. Compiles run on one background thread, so `make_request` (called
on a worker's event loop) returns at once with a `GrammarState` whose future completes later; the scheduler holds
the request back until then (engine/scheduler.py `_next_waiting`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from engine.grammar import GrammarSpec, GrammarState, check_spec, parse
from engine.request import InvalidRequestError

if TYPE_CHECKING:
    import xgrammar

    from engine.tokenizer import Tokenizer

_CACHE_SIZE = 256  # compiled grammars kept per engine


def tokenizer_available(model: str, load_format: str) -> bool:
    """Whether the model ships a tokenizer, without loading it: a .gguf file, or a folder with tokenizer.json (or
    one .gguf)."""
    from engine.loader import WeightLoadError, resolve_source

    if load_format == "dummy":
        return False
    try:
        fmt, path = resolve_source(model, load_format)
    except WeightLoadError:
        return False
    if fmt == "gguf":
        return True
    return os.path.isfile(os.path.join(path, "tokenizer.json")) or any(f.endswith(".gguf") for f in os.listdir(path))


def model_tokenizer(model: str, load_format: str) -> Tokenizer:
    from engine.loader import resolve_source
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_model_path(resolve_source(model, load_format)[1])


class GrammarCompiler:
    """Compiles wire specs against the model's tokenizer, each once (LRU by wire string); `available` False: the
    model has no tokenizer and grammars are refused (InvalidRequestError)."""

    def __init__(self, load_tokenizer: Callable[[], Tokenizer], vocab_size: int, stop_token_ids: tuple[int, ...],
                 available: bool = True) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.available = available
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._cache: OrderedDict[str, xgrammar.CompiledGrammar] = OrderedDict()
        self._pending: dict[str, Future[xgrammar.CompiledGrammar]] = {}
        self._lock = threading.Lock()  # submit runs on the caller's thread, compiles on the executor's
        self._executor: ThreadPoolExecutor | None = None
        self.compiles = 0  # grammars compiled (cache misses)
        self.hits = 0  # grammars found compiled

    def check(self, wire: str) -> None:
        """Raise InvalidRequestError unless `wire` parses and this model can compile it (fast: no compile)."""
        if not self.available:
            raise InvalidRequestError("structured outputs need the model's tokenizer, and this model has none")
        check_spec(wire)

    def submit(self, wire: str) -> Future[xgrammar.CompiledGrammar]:
        """The compiled grammar, now (cached) or later (compiling on the background thread)."""
        self.check(wire)
        with self._lock:
            hit = self._cache.get(wire)
            if hit is not None:
                self._cache.move_to_end(wire)
                self.hits += 1
                done: Future[xgrammar.CompiledGrammar] = Future()
                done.set_result(hit)
                return done
            if wire not in self._pending:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
                self._pending[wire] = self._executor.submit(self._compile, wire)
            return self._pending[wire]

    def compile(self, wire: str) -> xgrammar.CompiledGrammar:
        """`submit` and wait."""
        return self.submit(wire).result()

    def state(self, wire: str, output_token_ids: Sequence[int] = ()) -> GrammarState:
        """A matcher for `wire`. When the grammar is compiled already, tokens generated elsewhere (a resumed
        request's) are replayed now and one it refuses is an InvalidRequestError; otherwise before the first mask."""
        state = GrammarState(self.submit(wire), self.stop_token_ids)
        if state.ready() and not state.catch_up(output_token_ids):
            bad = output_token_ids[state.num_accepted]
            raise InvalidRequestError(f"output token {state.num_accepted} ({bad}) does not follow the request's grammar")
        return state

    def _compile(self, wire: str) -> xgrammar.CompiledGrammar:
        try:
            compiled = self._compiler_now().compile_grammar(parse(GrammarSpec.from_wire(wire)))
        except BaseException:
            with self._lock:
                self._pending.pop(wire, None)
            raise
        with self._lock:  # cached before it leaves `_pending`: a concurrent submit finds it in one or the other
            self.compiles += 1
            self._cache[wire] = compiled
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            self._pending.pop(wire, None)
        return compiled

    def _compiler_now(self) -> xgrammar.GrammarCompiler:
        if self._compiler is None:  # only the executor's one thread gets here
            self._compiler = _xgrammar_compiler(self._load_tokenizer(), self.vocab_size, self.stop_token_ids)
        return self._compiler


def _xgrammar_compiler(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]
                       ) -> xgrammar.GrammarCompiler:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    stops = list(stop_token_ids) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=stops)
    return xgr.GrammarCompiler(info, max_threads=2)
