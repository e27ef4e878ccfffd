"""8 simulated CPU devices: fsdp=8 and data=2 x fsdp=2 x tensor=2 train like 1 device;
the shared-prompt layout trains like whole rows."""

from helpers import run_on_cpu_devices


def test_sharded_training_matches_one_device():
    result = run_on_cpu_devices("sharded_train.py")
    assert result["devices"] == 8
    single = result["single"]
    assert len(single["losses"]) == 4 and single["losses"][-1] != single["losses"][0]
    for name in ("whole", "fsdp8", "d2f2t2"):
        # Sharded float32 sums are reordered: losses ~0.7 and norms ~1 agree to ~100
        # roundoffs over 4 steps; 1e-5.
        for key in ("losses", "grad_norms"):
            diff = max(abs(a - b) for a, b in zip(result[name][key], single[key]))
            assert diff <= 1e-5, (name, key, diff)
    # Parameters, optimizer state and batches really are split.
    f8, d2 = result["fsdp8"], result["d2f2t2"]
    assert "fsdp" in f8["q_proj"] and f8["adam_mu_q_proj"] == f8["q_proj"]
    assert f8["mu_shards"] == 8 and "fsdp" in f8["batch"] and "fsdp" in f8["prompt_batch"]
    assert "tensor" in d2["adam_mu_q_proj"] and d2["adam_mu_q_proj"] == d2["q_proj"]
    assert d2["mu_shards"] == 4 and "data" in d2["batch"]
