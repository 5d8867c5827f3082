"""benchmarks/sim_validate.py's own logic: repeated real runs merge into medians and ranges, a simulation-only run
writes its report, bad arguments are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.real_run import FIGURES, merge_repeats
from benchmarks.sim_validate import main

PROFILE = "benchmarks/profiles/cpu_smollm2_2026-12-06_grid8.json"


def test_repeated_runs_are_held_at_each_figures_median_with_their_range() -> None:
    runs = [{**{k: v for k, v in zip(FIGURES, row, strict=True)}, "requests_each": [[i]]}
            for i, row in enumerate([(100, 900, 60, 200, 0.5), (140, 700, 50, 260, 0.4), (120, 800, 70, 230, 0.45)])]
    real = merge_repeats(runs)
    assert [real[k] for k in FIGURES] == [120, 800, 60, 230, 0.45]
    assert real["range"] == {"ttft_p50_ms": [100, 140], "ttft_p99_ms": [700, 900], "itl_p50_ms": [50, 70],
                             "itl_p99_ms": [200, 260], "goodput_req_s": [0.4, 0.5]}
    assert [r["ttft_p50_ms"] for r in real["repeats"]] == [100, 140, 120]
    assert real["requests_each"] == [[0]]  # the per-request figures are the first run's


def test_each_figure_is_within_15_percent_unresolved_inside_the_real_interval_or_a_miss() -> None:
    from benchmarks.sim_validate import tally, verdicts

    diff = {"ttft_p50_ms": 0.15, "ttft_p99_ms": -0.2, "itl_p50_ms": None, "itl_p99_ms": 0.3, "goodput_req_s": -0.01}
    inside = {"ttft_p50_ms": False, "ttft_p99_ms": True, "itl_p99_ms": False, "goodput_req_s": False}
    got = verdicts(diff, inside)
    assert got == {"ttft_p50_ms": "within", "ttft_p99_ms": "unresolved", "itl_p99_ms": "miss",
                   "goodput_req_s": "within"}
    assert verdicts({"ttft_p99_ms": -0.2}, None) == {"ttft_p99_ms": "miss"}  # no interval: a miss is a miss
    assert tally({"5": {"a": {"verdict": got}, "b": {}}}) == {"within": 2, "unresolved": 1, "miss": 1}


def test_a_simulation_only_run_reports_every_figure(tmp_path: Path) -> None:
    res = main(["--sim-only", "--profile", PROFILE, "--rates", "0.5", "--num-requests", "6", "--modes",
                "disaggregated,colocated", "--out", str(tmp_path), "--label", "t"])
    for mode in ("disaggregated", "colocated"):
        sim = res["rates"]["0.5"][mode]["sim"]
        assert sim["completed"] == 6 and all(sim[k] > 0 for k in FIGURES)
        shares = sim["gaps_over"]["share_over"]
        assert sim["gaps_over"]["bound_ms"][0] == 5.0 and shares == sorted(shares, reverse=True)
        assert 0 < shares[0] <= 1  # a CPU decode step is longer than 5 ms
    assert json.loads((tmp_path / "sim_validate_cpu_t.json").read_text())["rates"].keys() == {"0.5"}


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--client-processes", "-1"], ["--device", "tpu"],
                                 ["--keep-logs", "FILE/logs"]])
def test_bad_arguments_are_refused(bad: list[str], tmp_path: Path) -> None:
    (tmp_path / "FILE").write_text("")  # --keep-logs under a plain file: no folder can be made there
    bad = [str(tmp_path / b) if b.startswith("FILE") else b for b in bad]
    with pytest.raises(SystemExit):
        main(["--profile", PROFILE, *bad, "--out", str(tmp_path)])


RECORDED = "benchmarks/results/sim_validate_cuda_h100_sustained_rate6_seed3_2026-12-06.json"
GPU_PROFILE = "benchmarks/profiles/h100_llama3_8b_v49k_sustained.json"


@pytest.mark.parametrize("what", ["admit", "speed", "both"])
def test_calibration_corrects_what_it_is_asked_to_and_the_recorded_table_reproduces(what: str, tmp_path: Path) -> None:
    """`--calibrate admit` (GPU runs: the serving path's fixed cost only), `speed` (the machine's speed only) or
    `both`; re-simulating a recorded H100 run gives the figures benchmarks/RESULTS.md reports for it."""
    res = main(["--sim-only", "--device", "cuda", "--recorded", RECORDED, "--profile", GPU_PROFILE, "--rates", "6",
                "--seed", "3", "--num-requests", "256", "--prompt-len", "1024:2048", "--output-len", "128",
                "--slo-ttft-ms", "500", "--slo-itl-ms", "30", "--modes", "colocated", "--calibrate", what,
                "--out", str(tmp_path)])["rates"]["6"]["colocated"]
    cal = res["calibration"]
    assert (cal["scale"] == 1.0) == (what == "admit")
    assert ("admit_ms" in cal) == (what != "speed")
    if what == "admit":
        recorded = json.loads(Path(RECORDED).read_text())["rates"]["6"]["colocated"]
        assert {k: res["sim"][k] for k in FIGURES} == {k: recorded["sim"][k] for k in FIGURES}
        assert res["real"]["ttft_p50_ms"] == recorded["real"]["ttft_p50_ms"]
        # The recorded requests give the real goodput's own interval, which holds the real figure.
        lo, hi = res["real"]["interval_90"]["goodput_req_s"]
        assert lo <= recorded["real"]["goodput_req_s"] <= hi and lo < hi
        assert "goodput_req_s" in res["sim_inside_real_interval_90"]


@pytest.mark.parametrize(("seed", "drift", "warned"), [(19, (0.94, 1.02), False), (23, (1.25, 1.30), True)])
def test_a_runs_drift_from_its_probes_is_read_from_its_step_logs_and_warned_of(
        seed: int, drift: tuple[float, float], warned: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The recorded co-located CPU runs at 0.3 req/s: seed 19 (19 of 20 figures within 15%) ran at the speed its
    probes read; seed 23 (1 of 20) ran 1.28x slower than its probes said, and the report says so."""
    from benchmarks.calibration import speed_drift

    recorded = f"benchmarks/results/sim_validate_cpu_seed{seed}_2026-12-07.json"
    profile = json.loads(Path(recorded).read_text())["args"]["profile"]
    res = main(["--sim-only", "--recorded", recorded, "--profile", profile, "--rates", "0.3", "--seed", str(seed),
                "--num-requests", "64", "--modes", "colocated", "--calibrate", "--out", str(tmp_path)])
    got = res["rates"]["0.3"]["colocated"]["speed_drift"]
    assert drift[0] <= got["drift"] <= drift[1], got
    assert ("speed moved" in capsys.readouterr().out) == warned
    assert speed_drift({"scale": 1.0}, {}) is None  # no lone decode steps: nothing to say


def test_admission_is_calibrated_against_the_tiny_prompts_step_as_the_workers_timed_it(tmp_path: Path) -> None:
    """A short prompt's step is host-bound on a GPU and moves between runs: `admit_ms` takes the step the workers'
    logs timed (`tiny_step_ms`) in place of the profile's price, so 5 ms less step is 5 ms more admission."""
    from simulator.cost_model import CostModel
    from simulator.profile import Profile

    model = CostModel(Profile.load(GPU_PROFILE))
    priced = model.prefill_ms(16) - model.overhead  # the step as the profile prices it
    data = json.loads(Path(RECORDED).read_text())
    admits = []
    for step_ms in (None, priced, priced - 5.0):
        alone = data["rates"]["6"]["colocated"]["measured_around"]["alone"]
        alone.pop("tiny_step_ms", None)
        if step_ms is not None:
            alone["tiny_step_ms"] = step_ms
        (tmp_path / "r.json").write_text(json.dumps(data))
        res = main(["--sim-only", "--device", "cuda", "--recorded", str(tmp_path / "r.json"), "--profile", GPU_PROFILE,
                    "--rates", "6", "--seed", "3", "--num-requests", "8", "--prompt-len", "1024:2048", "--modes",
                    "colocated", "--calibrate", "admit", "--out", str(tmp_path)])
        admits.append(res["rates"]["6"]["colocated"]["calibration"]["admit_ms"])
    assert admits[1] == pytest.approx(admits[0], abs=0.02) and admits[2] == pytest.approx(admits[0] + 5.0, abs=0.02)


def test_a_short_prompts_step_is_read_from_the_workers_step_logs(tmp_path: Path) -> None:
    from benchmarks.step_costs import prompt_step_ms

    rows = [{"t": 10.0, "ms": 30.0, "prompt_tokens": 16, "decode_rows": 0}, {"t": 11.0, "ms": 20.0, "prompt_tokens": 16,
            "decode_rows": 0}, {"t": 11.5, "ms": 9.0, "prompt_tokens": 0, "decode_rows": 1},
            {"t": 12.0, "ms": 90.0, "prompt_tokens": 16, "decode_rows": 3}, {"t": 20.0, "ms": 1.0, "prompt_tokens": 16,
            "decode_rows": 0}]
    for name, part in (("prefill-0", rows[:2]), ("decode-0", rows[2:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({**r, "pairs": 0, "decode_context": 0.0}) + "\n"
                                                        for r in part))
    assert prompt_step_ms(str(tmp_path), 9.0, 15.0, 16) == 25.0  # lone 16-token prompts only, inside the window
    assert prompt_step_ms(str(tmp_path), 9.0, 15.0, 32) is None


def test_prompts_are_calibrated_apart_from_decode_steps_by_the_lone_streams_prompt(tmp_path: Path) -> None:
    """`--calibrate speed`: decode steps by the lone stream's gap, prompts by its prompt's step as the worker timed
    it (`stream_step_ms`); a run recorded without that step scales both by the gap."""
    from simulator.cost_model import CostModel
    from simulator.profile import Profile

    data = json.loads(Path(RECORDED).read_text())
    alone = data["rates"]["6"]["colocated"]["measured_around"]["alone"]
    priced = CostModel(Profile.load(GPU_PROFILE)).prefill_ms(256)
    cals = []
    for step_ms in (None, 2.0 * priced):
        alone.pop("stream_step_ms", None)
        if step_ms is not None:
            alone["stream_step_ms"] = step_ms
        (tmp_path / "r.json").write_text(json.dumps(data))
        res = main(["--sim-only", "--device", "cuda", "--recorded", str(tmp_path / "r.json"), "--profile", GPU_PROFILE,
                    "--rates", "6", "--seed", "3", "--num-requests", "8", "--prompt-len", "1024:2048", "--modes",
                    "colocated", "--calibrate", "speed", "--out", str(tmp_path)])
        cals.append(res["rates"]["6"]["colocated"]["calibration"])
    assert cals[0]["prefill_scale"] == cals[0]["scale"] == cals[1]["scale"]
    assert cals[1]["prefill_scale"] == pytest.approx(2.0, abs=1e-3) and cals[1]["profile_prompt_ms"] > 0


def test_a_decode_steps_weight_and_row_parts_are_calibrated_apart() -> None:
    """Steps of one row and of PROBE_ROWS rows on the idle cluster give the weights' part and the per-row part of
    a decode step their own factors (a VM whose memory slowed 3x and whose compute 1.2x); the calibrated profile
    prices both probe steps as they ran, and a step of 16 rows by the same rule."""
    from benchmarks.calibration import PROBE_ROWS, calibrated, rows_scale
    from simulator.cost_model import CostModel
    from simulator.profile import Profile

    prof = Profile.load(PROFILE)
    grid = CostModel(prof)

    def part(rows: int) -> float:
        return grid.decode_ms(rows, 300.0) - grid.overhead

    per_row = (part(PROBE_ROWS) - part(1)) / (PROBE_ROWS - 1)
    fixed = part(1) - per_row

    def real(rows: int) -> float:
        return 3.0 * fixed + 1.2 * (part(rows) - fixed)

    cal = rows_scale(prof, [real(1), 300.0], [real(PROBE_ROWS), 300.0])
    assert cal["fixed_scale"] == pytest.approx(3.0, rel=1e-3) and cal["row_scale"] == pytest.approx(1.2, rel=1e-3)
    model = CostModel(calibrated(prof, {"scale": 3.0, **cal}))
    for rows in (1, PROBE_ROWS, 16):
        assert model.decode_ms(rows, 300.0) - model.overhead == pytest.approx(real(rows), rel=1e-3)
    assert rows_scale(prof, [real(1), 300.0], None) == {}
    assert rows_scale(prof, [real(1), 300.0], [0.5 * real(1), 300.0]) == {}  # steps fell with rows: no fit


def test_the_co_run_is_calibrated_from_the_probes_steps_beside_the_other_worker() -> None:
    """The co-run probe's one-row steps beside prompts over the lone stream's one-row steps set the profile's co-run
    multiplier at one row (larger batches keep theirs), and its prompts beside decode steps over the lone stream's
    prompt set the prompt multiplier; the simulator then prices steps beside the other worker by them. Without the
    probe's steps nothing; steps faster beside than alone read 1.0."""
    from benchmarks.calibration import STREAM_PROMPT, calibrated, co_run_scale, with_co_run
    from simulator.profile import Profile

    prof = Profile.load("benchmarks/profiles/cpu_smollm2_2026-12-06e.json")  # co-run timed at 1 and 4 rows
    assert prof.co_run is not None and prof.co_run.decode_batch[0] == 1
    alone = {"one_row_step": [90.0, 288.0], "co_run_step": [144.0, 290.0], "stream_step_ms": 300.0,
             "co_run_prompt_ms": 510.0}
    cal = co_run_scale(prof, alone)
    assert cal["co_run_decode_1"] == pytest.approx(1.6) and cal["co_run_prefill"] == pytest.approx(1.7)
    assert cal["profile_co_run_decode_1"] == prof.co_run.decode_at(1)
    co = calibrated(prof, {"scale": 1.0, **cal}).co_run
    assert co is not None and co.decode_at(1) == pytest.approx(1.6) and co.prefill_at(STREAM_PROMPT) == 1.7
    assert co.decode_at(prof.co_run.decode_batch[-1]) == prof.co_run.decode_by_batch[-1]
    assert co_run_scale(prof, {**alone, "co_run_step": None}) == {}
    assert "co_run_prefill" not in co_run_scale(prof, {**alone, "co_run_prompt_ms": None})
    assert co_run_scale(prof, {**alone, "co_run_step": [80.0, 288.0]})["co_run_decode_1"] == 1.0
    # A co-run timed at one batch only: the probe's figure stands for every batch; a grid without one row gains it;
    # a prompt curve by length is scaled through the probe's figure at its length.
    single = with_co_run(dataclasses.replace(prof, co_run=dataclasses.replace(
        prof.co_run, decode_batch=(), decode_by_batch=())), 1.6).co_run
    assert single is not None and single.decode == 1.6 and single.decode_at(8) == 1.6
    wider = with_co_run(dataclasses.replace(prof, co_run=dataclasses.replace(
        prof.co_run, decode_batch=(4,), decode_by_batch=(1.7,), prefill_tokens=(128, 512),
        prefill_by_tokens=(2.0, 1.5))), 1.6, 2.0).co_run
    assert wider is not None and wider.decode_batch == (1, 4) and wider.decode_by_batch == (1.6, 1.7)
    assert wider.prefill_at(STREAM_PROMPT) == pytest.approx(2.0)
    assert wider.prefill_at(512) == pytest.approx(1.5 * 2.0 / (2.0 - 0.5 / 3))


def test_each_probe_figure_is_read_from_its_own_window(tmp_path: Path) -> None:
    """`read_probes`: the lone prompts' step from the lone window only (the co-run probe's prompts, beside decode
    steps and slower, are 256 tokens too), the one-row step there, the rows probe's steps after it, and the co-run
    probe's steps beside the other worker's from its window; windows kept relative to the lone stream's start."""
    from benchmarks.calibration import PROBE_ROWS, STREAM_PROMPT, read_probes

    def step(t: float, ms: float, prompt: int = 0, rows: int = 0) -> dict[str, float]:
        return {"t": t, "ms": ms, "prompt_tokens": prompt, "pairs": 0, "decode_rows": rows, "decode_context": 300.0}

    prefill = [step(100.0, 300.0, STREAM_PROMPT), step(101.0, 320.0, STREAM_PROMPT),  # lone prompts
               step(120.0, 550.0, STREAM_PROMPT), step(120.6, 560.0, STREAM_PROMPT)]  # the co-run probe's
    decode = [step(100.5, 90.0, rows=1), step(100.6, 92.0, rows=1),  # the lone stream
              step(110.0, 120.0, rows=PROBE_ROWS),  # the rows probe
              step(120.1, 150.0, rows=1), step(120.3, 140.0, rows=1), step(120.7, 160.0, rows=1),
              step(120.9, 200.0, rows=1)]  # beside the co-run probe's prompts
    for name, rows in (("prefill-0", prefill), ("decode-0", decode)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    alone = {"probe_since": 105.0, "co_run_since": 115.0}
    read_probes(str(tmp_path), alone, 99.0, 130.0, co_run=True)
    assert alone["stream_step_ms"] == 310.0 and alone["one_row_step"] == (91.0, 300.0)
    assert alone["probe_rows_step"] == (120.0, 300.0) and alone["co_run_step"] == (155.0, 300.0)
    assert alone["co_run_prompt_ms"] == 555.0 and alone["windows_s"] == [6.0, 16.0, 31.0]
    assert "probe_since" not in alone and "co_run_since" not in alone
    plain = {"probe_since": 105.0, "co_run_since": 115.0}
    read_probes(str(tmp_path), plain, 99.0, 130.0, co_run=False)
    assert "co_run_step" not in plain


@pytest.mark.cluster  # a real 1P+1D SmolLM2 cluster on this machine (~40 s on 2 cores)
def test_a_real_run_replays_the_trace_and_measures_around_it(tmp_path: Path) -> None:
    res = main(["--profile", PROFILE, "--rates", "1", "--num-requests", "4", "--prompt-len", "16:32", "--output-len",
                "4", "--modes", "disaggregated", "--tries", "1", "--max-foreign", "64", "--quiet-wait-s", "0",
                "--out", str(tmp_path)])
    row = res["rates"]["1"]["disaggregated"]
    real, around = row["real"], row["measured_around"]
    assert real["completed"] == 4 and real["failed"] == 0 and all(real[k] > 0 for k in FIGURES)
    trace = (tmp_path / "sim_validate_trace_cpu_rate1.csv").read_text().splitlines()[1:]
    assert [q[:2] for q in real["requests_each"]] == [[int(line.split(",")[1]), 4] for line in trace]
    assert around["pulls"]["pulls"] == 4  # every request's KV handed from the prefill to the decode worker
    assert around["steps"]["decode-0"]["all"]["decode"]["steps"] >= 3  # the workers' step logs were read
    assert set(around["cpu_s"]) == {"prefill-0", "decode-0", "router", "client"}
    assert row["sim"]["completed"] == 4 and set(row["sim_over_real_minus_1"]) == set(FIGURES)
