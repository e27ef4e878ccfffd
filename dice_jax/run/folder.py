"""The run folder: one sub-folder per stage, a manifest of what is complete, resume.

    RUN_DIR/config.json          the config of the first launch (a resume must match it)
    RUN_DIR/manifest.json        {"stages": {"round_1/sample": {"completed_at": ...}, ...}}
    RUN_DIR/round_1/sample/      one folder per completed stage, renamed into place

A stage runs in a temporary folder and is renamed to its final name only when it finishes,
then recorded in the manifest (itself written by temp + rename). A stage that was killed
leaves no final folder, so running the command again redoes exactly the incomplete stages.
Resumable stages (training) work in a stable `NAME.partial/` folder instead, so their own
checkpoints survive a kill and the stage continues from the last one.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dice_jax.distributed import (
    agree,
    all_processes,
    barrier,
    broadcast,
    is_writer,
    process_count,
    process_index,
)
from dice_jax.errors import ConfigError
from dice_jax.fileio import atomic_directory, atomic_write_text, read_json, write_json

# Keys a resumed run may change without invalidating completed stages.
RESUME_MUTABLE_KEYS = ("rounds", "export_hf_each_round", "dice.guard.")
SHARED_TOKEN = ".shared-folder-token"  # multi-host: proves process 0's folder is everyone's


class RunFolder:
    def __init__(self, root: str, config: dict[str, Any]) -> None:
        self.root = os.path.abspath(root)
        if is_writer():
            self._create_root()
        barrier("run folder created")
        if not os.path.isdir(self.root):
            raise ConfigError(f"config.run_dir: {self.root} is not visible from process "
                              f"{process_index()}: a multi-host run needs a folder all hosts "
                              "share (NFS, Lustre, a mounted bucket)")
        self._check_shared()
        self._check_config(config)
        self._manifest_path = os.path.join(self.root, "manifest.json")
        barrier("config checked")
        self.manifest = self._read_manifest()
        agree("the run folder's manifest", sorted(self.manifest["stages"]))

    def _create_root(self) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(f"config.run_dir: {self.root} is an existing file, not a folder")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:  # a parent is a file, no permission, read-only file system
            raise ConfigError(f"config.run_dir: cannot create {self.root} "
                              f"({e.strerror or e})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"config.run_dir: {self.root} is not writable")

    def _check_shared(self) -> None:
        """Several processes: process 0 writes a random token that every other process
        must read back, so a run_dir that is not one shared folder stops here."""
        if process_count() == 1:
            return
        path = os.path.join(self.root, SHARED_TOKEN)
        token = np.asarray(broadcast(np.frombuffer(os.urandom(16), np.uint8)))  # process 0's
        if is_writer():
            atomic_write_text(path, token.tobytes().hex())
        barrier("shared token written")
        try:
            with open(path) as f:
                seen = f.read().strip()
        except OSError:
            seen = ""
        ok = np.asarray(seen == token.tobytes().hex())
        if not all(all_processes(ok)):
            raise ConfigError(f"config.run_dir: {self.root} is not the same folder on every "
                              "host (process 0's token file was not read back); use a folder "
                              "all hosts share")

    def _check_config(self, config: dict[str, Any]) -> None:
        path = os.path.join(self.root, "config.json")
        agree("the run config", config)
        if not bool(broadcast(np.asarray(os.path.exists(path)))):  # process 0's view
            if is_writer():
                write_json(path, config)
            return
        saved = read_json(path)
        changed = sorted(k for k in _flatten(config).keys() | _flatten(saved).keys()
                         if _flatten(config).get(k) != _flatten(saved).get(k)
                         and not k.startswith(RESUME_MUTABLE_KEYS))
        if changed:
            raise ConfigError(f"{path}: this run folder was started with a different config "
                              f"({', '.join(changed[:5])} differ); use a new run_dir or the "
                              "original settings")
        barrier("config read")
        if is_writer():
            write_json(path, config)  # record the mutable keys' new values

    def _read_manifest(self) -> dict[str, Any]:
        if not os.path.exists(self._manifest_path):
            return {"stages": {}}
        manifest = read_json(self._manifest_path)
        # A manifest entry whose folder vanished is not complete.
        manifest["stages"] = {name: info for name, info in manifest.get("stages", {}).items()
                              if os.path.isdir(self.path(name))}
        return manifest

    def path(self, stage: str) -> str:
        return os.path.join(self.root, stage)

    def is_complete(self, stage: str) -> bool:
        return stage in self.manifest["stages"]

    def info(self, stage: str) -> dict[str, Any]:
        return self.manifest["stages"].get(stage, {})

    def _mark_complete(self, stage: str, info: dict[str, Any] | None) -> None:
        self.manifest["stages"][stage] = {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                          **(info or {})}
        if is_writer():
            write_json(self._manifest_path, self.manifest)

    def run_stage(self, stage: str, work: Callable[[str], dict[str, Any] | None],
                  resumable: bool = False) -> str:
        """Runs `work(folder)` unless `stage` is complete; returns the stage's final path.

        `work` writes its artifacts into `folder` and may return a small JSON-able dict
        that the manifest keeps (counts, alpha*, ...). With several processes every one
        runs `work` (the computation is collective) but only process 0 writes the run
        folder: the others get a private scratch folder, except in a resumable stage,
        whose orbax checkpoints all processes save together into the same folder.
        """
        final = self.path(stage)
        if self.is_complete(stage):
            return final
        barrier(f"start {stage}")
        if is_writer():
            if os.path.exists(final):  # renamed but not recorded: the manifest write died
                shutil.rmtree(final)
            for stale in glob.glob(os.path.join(os.path.dirname(final),
                                                f".{os.path.basename(final)}.tmp-*")):
                shutil.rmtree(stale, ignore_errors=True)
        if resumable:
            partial = final + ".partial"
            if is_writer():
                os.makedirs(partial, exist_ok=True)
            barrier(f"partial {stage}")
            info = work(partial)
            barrier(f"end {stage}")
            if is_writer():
                os.rename(partial, final)
        elif is_writer():
            with atomic_directory(final) as tmp:
                info = work(tmp)
            barrier(f"end {stage}")
        else:
            scratch = tempfile.mkdtemp(prefix=f"dice-jax-p{process_index()}-")
            try:
                info = work(scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            barrier(f"end {stage}")
        self._mark_complete(stage, info)
        return final


def seed_stages(source: str, run_dir: str, stages: list[str] | tuple[str, ...]) -> list[str]:
    """Starts a new run folder `run_dir` from copies of `source`'s completed `stages`
    (those of them its manifest records); returns the stages copied. The new run writes
    its own config.json at launch, so its config may differ where the copied stages allow
    (e.g. the method after a shared round 0)."""
    done = read_json(os.path.join(source, "manifest.json"))["stages"]
    os.makedirs(run_dir, exist_ok=True)
    kept = [name for name in stages if name in done]
    for name in kept:
        shutil.copytree(os.path.join(source, name), os.path.join(run_dir, name))
    write_json(os.path.join(run_dir, "manifest.json"),
               {"stages": {name: done[name] for name in kept}})
    return kept


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
