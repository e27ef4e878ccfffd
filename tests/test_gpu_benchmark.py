"""`benchmarks/gpu.py --smoke`: every section runs at tiny size on the CPU and reports a row,
with the packages the GPU image lacks made unimportable, so the script cannot rot between
GPU loans."""

import json
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(TESTS), "benchmarks", "gpu.py")
# Not on the device image (see benchmarks/gpu.py's docstring).
MISSING = ("ml_collections", "skopt", "gguf", "tensorboardX", "if_verifiable", "datasets")


@pytest.mark.slow  # every GPU benchmark section on CPU; README "Test" names the command
def test_gpu_benchmark_smoke_runs_every_section(tmp_path):
    stubs = tmp_path / "stubs"
    for name in MISSING:  # shadow the installed packages: importing one fails
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('{name} is not on the GPU image')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stubs), env.get("PYTHONPATH")) if p)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "smoke"
    parts = {"parity": ["parity"], "train": ["train_jax", "train_torch"],
             "decode": ["decode_jax", "generate_torch"], "scoring": ["scoring"]}
    assert {s: sorted(p) for s, p in results["sections"].items()} == {
        s: sorted(p) for s, p in parts.items()}
    for section, got in results["sections"].items():
        for part, res in got.items():
            assert res["error"] is None, (section, part, res["error"])
            assert res["rows"], (section, part)
            for row in res["rows"]:
                assert row["row"] in proc.stdout  # every row printed as it came
    parity = results["sections"]["parity"]["parity"]["rows"][0]
    assert parity["pass"] and 0 < parity["dice_bf16_vs_fp32"] <= 2 * parity["hf_bf16_vs_fp32"]
    decode = results["sections"]["decode"]["decode_jax"]["rows"]
    assert len(decode) == 4 and all(r["tokens_per_s"] > 0 for r in decode)
    train = results["sections"]["train"]
    assert train["train_jax"]["rows"][0]["vs_peer"] > 0
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 10 and "| error: " not in table  # header + 9 rows
