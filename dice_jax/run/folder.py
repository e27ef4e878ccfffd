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
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from dice_jax.errors import ConfigError, DiceError
from dice_jax.fileio import atomic_directory, read_json, write_json

# Keys a resumed run may change without invalidating completed stages.
RESUME_MUTABLE_KEYS = ("rounds", "export_hf_each_round")


class RunFolder:
    def __init__(self, root: str, config: dict[str, Any]) -> None:
        self.root = os.path.abspath(root)
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise ConfigError(f"config.run_dir: {self.root} is an existing file, not a folder")
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:  # a parent is a file, no permission, read-only file system
            raise ConfigError(f"config.run_dir: cannot create {self.root} "
                              f"({e.strerror or e})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"config.run_dir: {self.root} is not writable")
        self._check_config(config)
        self._manifest_path = os.path.join(self.root, "manifest.json")
        self.manifest = self._read_manifest()

    def _check_config(self, config: dict[str, Any]) -> None:
        path = os.path.join(self.root, "config.json")
        if not os.path.exists(path):
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
        write_json(path, config)  # record the mutable keys' new values

    def _read_manifest(self) -> dict[str, Any]:
        if not os.path.exists(self._manifest_path):
            return {"stages": {}}
        try:
            with open(self._manifest_path) as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise DiceError(f"{self._manifest_path}: corrupt manifest ({e})") from None
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
        write_json(self._manifest_path, self.manifest)

    def run_stage(self, stage: str, work: Callable[[str], dict[str, Any] | None],
                  resumable: bool = False) -> str:
        """Runs `work(folder)` unless `stage` is complete; returns the stage's final path.

        `work` writes its artifacts into `folder` and may return a small JSON-able dict
        that the manifest keeps (counts, alpha*, ...).
        """
        final = self.path(stage)
        if self.is_complete(stage):
            return final
        if os.path.exists(final):  # renamed but not recorded: the manifest write was killed
            shutil.rmtree(final)
        for stale in glob.glob(os.path.join(os.path.dirname(final),
                                            f".{os.path.basename(final)}.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True)
        if resumable:
            partial = final + ".partial"
            os.makedirs(partial, exist_ok=True)
            info = work(partial)
            os.rename(partial, final)
        else:
            with atomic_directory(final) as tmp:
                info = work(tmp)
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
