import atexit
import fcntl
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA compilation cache for the whole run: many modules compile the same
# programs (the tiny model's train step, sampler and scorer), in the two xdist workers and
# in the subprocesses the tests start (they inherit the environment). The first process to
# load this file (the xdist controller, or a plain pytest run) makes the folder and removes
# it at exit; the workers inherit its path. A cached program is the same executable, so no
# result changes; a cache the caller already set is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dice_jax_test_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # A size limit turns on JAX's file lock around cache reads and writes: without it a
    # process may read an entry another one is still writing.
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 * 2**30)

# A folder for work done once per test session whichever process asks first (`tiny_run`),
# made like the cache folder above and shared the same way.
if "DICE_JAX_TEST_SHARED" not in os.environ:
    os.environ["DICE_JAX_TEST_SHARED"] = tempfile.mkdtemp(prefix="dice_jax_test_shared_")
    atexit.register(shutil.rmtree, os.environ["DICE_JAX_TEST_SHARED"], True)

# tests/workers/ holds scripts the tests run in subprocesses (helpers.run_on_cpu_devices),
# never test modules.
collect_ignore = ["workers"]

# The longest modules first: with `pytest -n 2 --dist loadfile` (README) each module runs
# whole on one worker, in collection order, so starting the long ones first keeps one
# worker from finishing alone with a long module at the end. A serial run only changes
# order.
LONGEST_FIRST = ("test_multihost_run.py", "test_train_run.py", "test_train_sharded.py",
                 "test_toy_task.py", "test_reward_health.py",
                 "test_builtin_data.py", "test_sampling_smollm2.py", "test_sampling.py",
                 "test_gguf.py", "test_scoring.py", "test_train_step.py", "test_evaluate.py")


@pytest.fixture(scope="session")
def tiny_run() -> str:
    """`configs/tiny.py` run end to end on one CPU device, once per test session: the first
    process (xdist worker) to ask runs it under a file lock, the others wait for it and
    share the folder. Tests only read it (rerunning the finished command writes nothing)."""
    from helpers import train_tiny

    run_dir = os.path.join(os.environ["DICE_JAX_TEST_SHARED"], "tiny")
    with open(run_dir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not os.path.exists(run_dir + ".done"):
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed attempt starts over
            train_tiny(run_dir)
            open(run_dir + ".done", "w").close()
    return run_dir


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
