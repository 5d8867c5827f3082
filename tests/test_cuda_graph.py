"""The CUDA-graph input staging: padded (bucket, q) batches give the same logits and KV writes as the eager
batch. Off CUDA the runner computes the captured shapes eagerly, so the padding rules (padding tokens write
no KV, real queries never see them, padding rows read harmlessly) are checked here with the Triton kernels
under the interpreter; on a GPU benchmarks/gpu_bench.py checks graph replays against the torch reference."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.batch import BatchSeq, build_batch  # noqa: E402
from engine.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from engine.cuda_graph import CUDAGraphRunner  # noqa: E402
from engine.kv_cache_manager import KVCacheManager  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_position_embeddings=64, eos_token_ids=(0,), bos_token_id=1)
BS = 4


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    cfg = EngineConfig(model="tiny", load_format="dummy", dummy_model=TINY, dtype="float32", device="cpu",
                       attention_backend="triton", cache=CacheConfig(num_blocks=48, block_size=BS))
    return ModelRunner(cfg, torch.device("cpu"), num_blocks=48, max_model_len=64)


@torch.inference_mode()
def run_both(runner: ModelRunner, seqs: list[BatchSeq], q: int, ids_on_device: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    kv = KVCacheManager(48, BS)
    kv.allocate("other", 9)  # rows and blocks not at zero
    for s in seqs:
        assert kv.allocate(s.request_id, s.start + len(s.token_ids))
    torch.manual_seed(0)
    runner.kv_cache.normal_()  # context KV the queries attend to
    start_cache = runner.kv_cache.clone()
    ids, pos, meta, logits_idx = build_batch(seqs, kv, runner.device)
    eager = runner.model.compute_logits(runner.model(ids, pos, runner.kv_cache, meta, runner.attn)[logits_idx])
    eager_cache = runner.kv_cache.clone()
    runner.kv_cache.copy_(start_cache)
    graphs = CUDAGraphRunner(runner.model, runner.kv_cache, runner.attn, max_batch=8, max_model_len=64, block_size=BS)
    graphs.capture(verify_q=3)
    assert graphs.query_len([len(s.token_ids) for s in seqs], [s.num_logits for s in seqs]) == q
    if ids_on_device:  # the host sees placeholders for the first sequences; their ids arrive as a device tensor
        ids = torch.tensor([s.token_ids[0] for s in seqs[:ids_on_device]], device=runner.device)
        host = [BatchSeq(s.request_id, s.start, [0], 1) for s in seqs[:ids_on_device]] + seqs[ids_on_device:]
        padded = graphs.run(host, kv, q, ids)
    else:
        padded = graphs.run(seqs, kv, q)
    # KV the eager batch did not write must be untouched; what it wrote must match (up to the kernels' order of
    # summation: the padded layout may run the decode kernel where the eager batch ran the prefill kernel).
    untouched = eager_cache == start_cache
    same_kv = torch.equal(runner.kv_cache[untouched], start_cache[untouched]) and torch.allclose(
        runner.kv_cache, eager_cache, rtol=1e-4, atol=1e-4)
    return eager, padded, same_kv


def test_decode_batch_padded_to_bucket(runner: ModelRunner) -> None:
    seqs = [BatchSeq("a", 5, [11], 1), BatchSeq("b", 13, [12], 1), BatchSeq("c", 2, [13], 1)]  # bucket 4
    eager, padded, same_kv = run_both(runner, seqs, q=1)
    assert padded.shape == eager.shape == (3, TINY.vocab_size)
    torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
    assert same_kv, "padding rows wrote KV"


@pytest.mark.parametrize("on_device", [3, 2])
def test_decode_ids_from_the_device(runner: ModelRunner, on_device: int) -> None:
    """A guessed step: the first rows' ids come from the device, the rest (joining requests) from the host."""
    seqs = [BatchSeq("a", 5, [11], 1), BatchSeq("b", 13, [12], 1), BatchSeq("c", 2, [13], 1)]
    eager, padded, same_kv = run_both(runner, seqs, q=1, ids_on_device=on_device)
    assert same_kv
    torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_token_rows", [64, 0], ids=["per-token", "per-sequence"])
def test_verification_batch_with_uneven_drafts(runner: ModelRunner, per_token_rows: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests with 2, 1 and 0 drafts in one q = 3 graph: pads after each request's real tokens, in both
    attention layouts (one virtual sequence per token: decode kernel; one per request: prefill kernel)."""
    monkeypatch.setattr("engine.cuda_graph.PER_TOKEN_MAX_ROWS", per_token_rows)
    seqs = [BatchSeq("a", 6, [11, 20, 21], 3), BatchSeq("b", 13, [12, 22], 2), BatchSeq("c", 3, [13], 1)]
    eager, padded, same_kv = run_both(runner, seqs, q=3)
    assert padded.shape == eager.shape == (6, TINY.vocab_size)
    torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
    assert same_kv, "padding tokens wrote KV"


def test_graph_eligibility(runner: ModelRunner) -> None:
    graphs = CUDAGraphRunner(runner.model, runner.kv_cache, runner.attn, max_batch=8, max_model_len=64, block_size=BS)
    assert graphs.query_len([1, 1], [1, 1]) == 1
    assert graphs.query_len([2, 1], [2, 1]) is None  # no verification graphs captured
    graphs.capture(verify_q=3)
    assert graphs.query_len([2, 1], [2, 1]) == 3
    assert graphs.query_len([4, 1], [4, 1]) is None  # more drafts than captured
    assert graphs.query_len([5], [1]) is None  # a prefill chunk
    assert graphs.query_len([1] * 9, [1] * 9) is None  # beyond the largest bucket


def test_padding_near_the_context_limit(runner: ModelRunner) -> None:
    """A request at the last position of the context, padded to q = 3, must not index past the rotary table."""
    seqs = [BatchSeq("a", 63, [11], 1), BatchSeq("b", 6, [12, 20, 21], 3)]
    eager, padded, same_kv = run_both(runner, seqs, q=3)
    torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
    assert same_kv
