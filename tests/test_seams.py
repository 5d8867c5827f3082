"""The seams between packages are APIs, not conventions: checked on the source of every module outside engine/.

- Nothing outside engine/ uses an `LLMEngine` attribute that is not part of its public API (public methods and
  properties, and the public attributes its `__init__` sets), so the engine's internals (its KV cache manager,
  scheduler, runner) can change without a worker noticing.
- Nothing reaches a private (`_x`) attribute of another object, except the few listed below with their reason.
- Every engine sampling parameter travels on the wire under its own name (proto/convert.py copies them by name).
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from engine.request import SamplingParams
from proto import disagg_pb2
from proto.convert import ROUTER_ONLY_PARAMS, params_from_proto, params_to_proto

ROOT = Path(__file__).resolve().parent.parent
# Everything but engine/ itself, and tests/ and benchmarks/, which probe engine internals on purpose (white-box
# tests of the scheduler and block pool; micro-benchmarks of CUDA graphs and kernels).
PACKAGES = ("worker", "prefill_worker", "decode_worker", "router", "deploy", "kvtransfer", "proto")
# (module, expression): why a private attribute of another object is touched there.
PRIVATE_ALLOWED = {
    ("router/registry.py", "w._removed"): "WorkerState is defined in the same module",
    ("kvtransfer/local.py", "peer._inbox"): "the peer is another LocalAgent (same class, same module)",
    ("deploy/cli.py", "argparse._SubParsersAction"): "argparse's type for sub-command parsers",
    ("kvtransfer/cuda_ipc.py", "torch.UntypedStorage._new_shared_cuda"): "torch's CUDA IPC entry points",
    ("kvtransfer/cuda_ipc.py", "self.kv_cache.untyped_storage()._share_cuda_"): "torch's CUDA IPC entry points",
}


def modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "_pb2" not in p.name]


def engine_api() -> set[str]:
    """Public names of LLMEngine: its public methods and properties, and the public attributes __init__ sets."""
    tree = ast.parse((ROOT / "engine/engine.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LLMEngine")
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    names |= {t.attr for n in ast.walk(init) if isinstance(n, ast.Assign | ast.AnnAssign)
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
              if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"}
    return {n for n in names if not n.startswith("_")}


def engine_uses(path: Path) -> list[tuple[int, str]]:
    """(line, expression) of every attribute read on something the code calls an engine (`engine`, `eng`,
    `x.engine`), engine configs (`config.engine`) excepted."""
    out = []
    for n in ast.walk(ast.parse(path.read_text())):
        if not isinstance(n, ast.Attribute):
            continue
        base = ast.unparse(n.value)
        if (base in ("engine", "eng") or base.endswith(".engine")) and not base.endswith(("config.engine",
                                                                                           "cfg.engine")):
            out.append((n.lineno, f"{base}.{n.attr}"))
    return out


def test_nothing_outside_the_engine_reaches_past_its_api() -> None:
    api = engine_api()
    assert {"step", "receive_kv", "kv_received", "kv_failed", "lease", "release_lease", "load"} <= api
    assert not api & {"kv", "runner", "scheduler", "requests"}, "engine internals must be private"
    bad = [f"{p.relative_to(ROOT)}:{line}: {expr}" for p in modules() for line, expr in engine_uses(p)
           if expr.rsplit(".", 1)[1] not in api]
    assert not bad, "outside engine/, use only LLMEngine's public API:\n" + "\n".join(bad)


def private_reaches(path: Path) -> list[tuple[int, str]]:
    """(line, expression) of every `x._attr` (not dunder) where x is not self or cls."""
    return [(n.lineno, ast.unparse(n)) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
            and ast.unparse(n.value) not in ("self", "cls")]


def test_no_private_attribute_of_another_object_is_touched() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line}: {expr}" for p in modules() for line, expr in private_reaches(p)
           if (str(p.relative_to(ROOT)), expr) not in PRIVATE_ALLOWED]
    assert not bad, "private attributes of other objects:\n" + "\n".join(bad)


def test_the_checks_catch_a_reach() -> None:
    """The two checks above fire on the reaches they exist for."""
    api = engine_api()
    fake = ROOT / "tests" / "_seam_probe.py"
    fake.write_text("def f(self):\n    self.aengine.engine.kv.free('x')\n    return other._secret\n")
    try:
        exprs = [e for _, e in engine_uses(fake)]
        assert "self.aengine.engine.kv" in exprs and "kv" not in api
        assert [e for _, e in private_reaches(fake)] == ["other._secret"]
    finally:
        fake.unlink()


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(max_tokens=7, temperature=0.0, top_k=5, top_p=0.5, min_p=0.25, seed=-3, repetition_penalty=1.5,
                   frequency_penalty=-1.0, presence_penalty=2.0, stop_token_ids=(4, 5), ignore_eos=True, logprobs=0,
                   prompt_logprobs=3),
    SamplingParams(logit_bias=((7, -2.5), (3, 1.0)), bad_words_ids=((9,), (4, 6, 8))),
])
def test_every_sampling_parameter_crosses_the_wire_by_name(params: SamplingParams) -> None:
    wire = {f.name for f in disagg_pb2.SamplingParams.DESCRIPTOR.fields}
    engine = {f.name for f in dataclasses.fields(SamplingParams)} - ROUTER_ONLY_PARAMS
    assert wire == engine, "proto SamplingParams and engine SamplingParams must have the same fields"
    back = params_from_proto(disagg_pb2.SamplingParams.FromString(params_to_proto(params).SerializeToString()))
    assert dataclasses.replace(back, stop=params.stop, skip_special_tokens=params.skip_special_tokens) == params


def test_the_first_conversion_imports_nothing() -> None:
    """A worker's first request must not pay a module import in its handler: protobuf imports descriptor_pb2 on
    a descriptor's first GetOptions() (0.2 s without bytecode caches, seen on a fresh GPU machine)."""
    code = ("import sys\nfrom proto import disagg_pb2\nfrom proto.convert import params_from_proto, params_to_proto\n"
            "from engine.request import SamplingParams\nbefore = set(sys.modules)\n"
            "p = SamplingParams(logit_bias=((7, 1.0),), bad_words_ids=((9,),), stop_token_ids=(4,))\n"
            "params_from_proto(disagg_pb2.SamplingParams.FromString(params_to_proto(p).SerializeToString()))\n"
            "print(sorted(set(sys.modules) - before))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
