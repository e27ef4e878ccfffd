"""One run over two processes (hosts): `python -m dice_jax.train` as one SPMD program.

Two processes with 4 simulated CPU devices each join one job through the launch
environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) and run
`configs/tiny.py` end to end (start evaluation, round 0, two DICE rounds, reports, HF
export) on one fsdp=8 mesh. The reference is the same config in one process on one device
(the session's shared tiny run, conftest): the same programs but for the sharding, so only
the order of float32 sums differs (cross-process all-reduces against whole arrays).
Process 1 writes nothing into the run folder but its shards of the orbax checkpoints.
"""

import json
import os
import socket
import subprocess

import numpy as np
import pytest
from helpers import REPO, tiny_command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if name not in extra:
            env.pop(name, None)
    return env


def _train(run_dir: str, env: dict[str, str], *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(tiny_command(run_dir, *overrides), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def start_two(run_dir: str, *overrides: str, process_1: dict[str, str] | None = None,
              **env: str) -> list[subprocess.Popen]:
    """Both processes of a 2 x 4-device job; `process_1`: extra variables for process 1."""
    port = str(_free_port())
    return [_train(run_dir, _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), **env,
                                 **((process_1 or {}) if i else {})), *overrides)
            for i in range(2)]


def two_processes(run_dir: str, *overrides: str, write_log: str = "") -> list[tuple[int, str]]:
    return _finish(start_two(run_dir, *overrides, DICE_JAX_WRITE_LOG=write_log))


def _policy(run_dir: str, t: int) -> list[np.ndarray]:
    import jax

    from dice_jax.checkpoints import load_model

    params = load_model(os.path.join(run_dir, f"round_{t}", "train", "policy"),
                        with_tokenizer=False).params
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_same_training(single: str, multi: str, weights_atol: float) -> None:
    """Rounds 0-2: the same steps, losses within 1e-5 (log-sigmoids of float32 log-prob
    differences: reordered sums only) and round 2's weights within `weights_atol`."""
    for t in (0, 1, 2):
        la = _rows(os.path.join(single, f"round_{t}", "train", "metrics.jsonl"))
        lb = _rows(os.path.join(multi, f"round_{t}", "train", "metrics.jsonl"))
        assert [r["step"] for r in la] == [r["step"] for r in lb]
        np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb],
                                   rtol=0, atol=1e-5)
    for x, y in zip(_policy(single, 2), _policy(multi, 2), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=weights_atol)


def _assert_only_process_0_writes(log: str, run_dir: str) -> None:
    """The write log (DICE_JAX_WRITE_LOG) has process 0's files in `run_dir`, no other's."""
    with open(log) as f:
        writes = [line.split(" ", 1) for line in f.read().splitlines()]
    assert any(pid == "0" and path.startswith(run_dir) for pid, path in writes)
    assert [path for pid, path in writes if pid != "0" and path.startswith(run_dir)] == []


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    multi, log = str(root / "multi"), str(root / "writes.log")
    procs = start_two(multi, DICE_JAX_WRITE_LOG=log)
    try:  # the reference runs meanwhile (here, or in another xdist worker)
        single = request.getfixturevalue("tiny_run")
    finally:
        results = _finish(procs)
    for i, (code, err) in enumerate(results):
        assert code == 0, f"process {i}: {err[-3000:]}"
    return single, multi, log, results


def test_two_processes_give_the_one_process_run(runs):
    single, multi, _, _ = runs
    for t in (1, 2):
        a = np.load(os.path.join(single, f"round_{t}", "sample", "samples.npz"))
        b = np.load(os.path.join(multi, f"round_{t}", "sample", "samples.npz"))
        for key in a.files:
            if a[key].dtype.kind in "iub":  # token ids, lengths, offsets: identical
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"round {t} {key}")
            else:  # sampler log-probs: float32 log-softmax of magnitude ~5, its matmul
                # and vocabulary sums split over 8 devices against whole: a few roundoffs
                # (measured 2.1e-6 relative)
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
        for name in ("pairs.jsonl", "mixed.jsonl"):
            key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
            assert [key(r) for r in _rows(os.path.join(single, f"round_{t}", "data", name))] \
                == [key(r) for r in _rows(os.path.join(multi, f"round_{t}", "data", name))]
        sa = np.load(os.path.join(single, f"round_{t}", "score", "scores.npz"))
        sb = np.load(os.path.join(multi, f"round_{t}", "score", "scores.npz"))
        for key in sa.files:
            # Sequence log-probs are sums of ~100 float32 terms of magnitude ~5: 1e-5
            # relative to the sum covers a reordered reduction.
            np.testing.assert_allclose(sa[key], sb[key], rtol=1e-5, atol=0, err_msg=key)
    # Weights of order 0.02-1 after 12 AdamW steps at lr 1e-3: Adam divides each gradient
    # by its own root mean square, so reordered float32 gradient sums move
    # near-zero-gradient weights by a few 1e-5 (measured: one of 16384 weights of a layer
    # 3.5e-5 apart at the last round, against the unsharded run).
    _assert_same_training(single, multi, weights_atol=5e-5)


def test_process_1_writes_nothing_into_the_run_folder(runs):
    single, multi, log, results = runs
    _assert_only_process_0_writes(log, multi)
    # Apart from orbax's per-process files (shards, array metadata), content-named orbax
    # files, TensorBoard event names and reference-cache keys (they hold the time, the
    # host or the run path), the two folders hold the same files.
    def files(root):
        paths = {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                 for f in fs}
        return {p for p in paths if "process_" not in p and "/params/d/" not in p
                and "tfevents" not in p and "ref_logps" not in p}
    assert files(multi) - {".shared-folder-token"} == files(single)
    # Process 1 logs warnings only, tagged with its index.
    assert all("[process 1]" in line for line in results[1][1].splitlines()
               if "dice_jax" in line)


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS is not"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "2"}, "must lie in [0, 2)"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two",
      "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_bad_launch_is_one_error_line_before_any_work(tmp_path, env, message):
    run_dir = tmp_path / "run"
    full = _env(4, **env)
    (code, err), = _finish([_train(str(run_dir), full)], timeout=120)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:")
    assert message in err and not run_dir.exists()


def test_mesh_that_does_not_match_the_global_devices(tmp_path):
    run_dir = tmp_path / "run"
    (code, err), = _finish([_train(str(run_dir), _env(4), "--config.mesh.fsdp=3")],
                           timeout=120)
    assert code == 2 and "does not match the 4 available device(s)" in err
    assert not run_dir.exists()


@pytest.mark.slow  # two more 2-process runs; README "Test" names the command
def test_sigterm_to_one_process_checkpoints_both_and_the_relaunch_finishes(runs, tmp_path):
    _, multi, _, _ = runs
    run_dir = str(tmp_path / "preempted")
    procs = start_two(run_dir, process_1={"DICE_JAX_TERM_AT": "round_1/train:step=3"})
    for code, err in _finish(procs, timeout=600):
        assert code == 143, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("stopped: SIGTERM: checkpoint of step 3")
    assert "3" in os.listdir(os.path.join(run_dir, "round_1", "train.partial", "checkpoints"))
    for code, err in two_processes(run_dir):
        assert code == 0, err[-3000:]
    for x, y in zip(_policy(multi, 2), _policy(run_dir, 2), strict=True):
        np.testing.assert_array_equal(x, y)  # the same processes and mesh: the same sums


@pytest.mark.slow  # two more 2-process runs; README "Test" names the command
def test_a_killed_process_stops_the_other_and_the_relaunch_finishes(runs, tmp_path):
    import time

    _, multi, _, _ = runs
    run_dir = str(tmp_path / "killed")
    procs = start_two(run_dir, process_1={"DICE_JAX_KILL_AT": "round_1/train:step=2"})
    procs[1].communicate(timeout=600)
    assert procs[1].returncode == -9
    killed_at = time.monotonic()
    (code, err), = _finish(procs[:1], timeout=300)
    # The liveness watchdog notices the lost process before JAX's heartbeat would.
    assert code == 3 and time.monotonic() - killed_at < 180
    assert err.strip().splitlines()[-1].startswith("error: process 1 of 2 stopped answering")
    for code, err in two_processes(run_dir):
        assert code == 0, err[-3000:]
    for x, y in zip(_policy(multi, 2), _policy(run_dir, 2), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # two more tiny runs; README "Test" names the command
def test_offline_dpo_on_two_processes_gives_the_one_process_run(tmp_path):
    """The baseline's stages (round 0, two rounds of DPO on D_offline, evaluation,
    reports, export) as one SPMD program: the losses and final weights of 1 x 8 devices,
    and process 1 writes nothing into the run folder."""
    method = "--config.method=offline_dpo"
    single, multi, log = str(tmp_path / "single"), str(tmp_path / "multi"), str(
        tmp_path / "writes.log")
    (code, err), = _finish([_train(single, _env(8), method)])
    assert code == 0, err[-3000:]
    for i, (code, err) in enumerate(two_processes(multi, method, write_log=log)):
        assert code == 0, f"process {i}: {err[-3000:]}"
    # As the DICE run above: Adam divides reordered float32 gradient sums by their own
    # root mean square (measured: one of 16384 weights of a layer 2.8e-5 apart).
    _assert_same_training(single, multi, weights_atol=5e-5)
    _assert_only_process_0_writes(log, multi)


def test_llm_judge_stage_on_two_processes_gives_the_one_process_ratings(tmp_path):
    """The LLM-judge baseline's rating stage on a mesh spanning 2 processes x 4 devices:
    the same greedy judgements on both processes as on 1 process x 8 devices. (A whole
    llm_judge run stops at its data stage with a random policy, which never writes a
    parseable score; its other stages are the DICE run's.)"""
    from helpers import run_processes_on_cpu_devices

    single, = run_processes_on_cpu_devices("judge_stage.py", _free_port(), 1,
                                           tmp_path / "single", processes=1, devices=8)
    both = run_processes_on_cpu_devices("judge_stage.py", _free_port(), 2, tmp_path / "multi",
                                        processes=2, devices=4)
    assert single["devices"] == 8 and [r["devices"] for r in both] == [8, 8]
    assert single["info"]["responses"] == 6 and len(single["judgements"]) == 6
    for result in both:
        assert result["judgements"] == single["judgements"]
        assert result["nan"] == single["nan"]
