"""The command lines' shared front: absl flags, ml_collections config files, one error line.

Every CLI (`train`, `evaluate`, `report`, `convert`, the memory plan, the judge's tools)
declares its flags with absl and, where it takes a run config, the `--config=FILE[:ARG]`
flag of ml_collections' `config_flags` with its `--config.KEY=VALUE` overrides. `--help`
prints the command's own flags, `--helpfull` adds every config key with its default and
help, and `--flagfile=FILE` reads more arguments from a file, as in other JAX programs.

Why not `absl.app.run`: it reports a bad flag as "FATAL Flags parsing error" and exits
with code 1, while these commands promise one `error:` line and exit code 2 for any bad
input; and absl's global FLAGS can define a flag once per process, while tests and
library users call `main(argv)` repeatedly. So each call parses with a fresh
`flags.FlagValues`.
"""

import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from dice_jax.errors import ConfigError, DiceError

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")
HELPFULL_FLAGS = ("--helpfull", "-helpfull")


class HelpRequested(Exception):
    """--help / --helpfull: print this text and exit 0."""


def _config_overrides(args: Sequence[str]) -> list[str]:
    keys = []
    for arg in args:
        if arg.startswith(("--config.", "-config.")):
            keys.append(arg.lstrip("-")[len("config."):].split("=", 1)[0])
    return keys


def parse_command_line(argv: Sequence[str], prog: str, doc: str,
                       define: Callable[[flags.FlagValues], None] | None = None,
                       run_config: bool = False) -> tuple[flags.FlagValues, list[str]]:
    """Parses `argv` (without the program name); returns the flags and the positional
    arguments. Raises ConfigError for bad input and HelpRequested for --help."""
    fv = flags.FlagValues()
    if define is not None:
        define(fv)
    wants_full = any(a in HELPFULL_FLAGS for a in argv)
    if wants_full or any(a in HELP_FLAGS for a in argv):
        raise HelpRequested(_help_text(fv, prog, doc, run_config, wants_full))
    try:
        args = fv.read_flags_from_files(list(argv), force_gnu=False)
    except flags.Error as e:
        raise ConfigError(f"--flagfile: {e}") from None
    args, to_none = _normalise(args)
    if run_config:
        from ml_collections import config_flags

        overrides = _config_overrides(args)
        if overrides and not any(a.split("=", 1)[0].lstrip("-") == "config" for a in args):
            raise ConfigError("--config=FILE is required (e.g. --config=configs/smollm2.py)")
        _check_config_file(args)
        _check_override_keys(overrides + [key for key, _ in to_none])
        config_flags.DEFINE_config_file("config", None, "a config file whose get_config() "
                                        "returns a dice_jax.config.RunConfig (FILE[:ARG])",
                                        flag_values=fv, lock_config=False,
                                        sys_argv=[prog, *args])
    try:
        positional = fv([prog, *args])[1:]
    except (flags.Error, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(_flag_error(e)) from None
    if run_config:
        if fv["config"].value is None:
            raise ConfigError("--config=FILE is required (e.g. --config=configs/smollm2.py)")
        _check_loaded(fv)
        _set_none(fv["config"].value, to_none)
    return fv, positional


def _check_config_file(args: list[str]) -> None:
    import os

    for arg in args:
        name, _, value = arg.partition("=")
        if name.lstrip("-") == "config" and not os.path.isfile(value.partition(":")[0]):
            raise ConfigError(f"--config: file {value.partition(':')[0]!r} not found")


def _check_override_keys(keys: list[str]) -> None:
    """Unknown `--config.KEY`s, named with a "did you mean" before the file is read."""
    from dice_jax.config import RunConfig
    from dice_jax.settings import has_key, unknown_key_error

    schema = RunConfig()
    for key in keys:
        if not has_key(schema, key):
            raise unknown_key_error(schema, key)


def _check_loaded(fv: flags.FlagValues) -> None:
    """The config file was found and returned a RunConfig."""
    from dice_jax.config import RunConfig

    config = fv["config"].value
    if isinstance(config, RunConfig):
        return
    try:
        config.run_dir  # noqa: B018  (ml_collections defers a file error to first use)
    except Exception as e:  # its loader raises IOError / ImportError / any get_config error
        raise ConfigError(f"--config: {_flag_error(e)}") from None
    raise ConfigError(f"--config: get_config() returned a {type(config).__name__}; it must "
                      "return a dice_jax.config.RunConfig")


def _normalise(args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """`--print-config` spelt with dashes is `--print_config`; `--config.KEY=none` for an
    optional key is taken out (config_flags parses it with the value's type) and returned
    to be set to None after parsing."""
    out: list[str] = []
    to_none: list[tuple[str, str]] = []
    for arg in args:
        name, eq, value = arg.partition("=")
        if name.startswith("--config."):
            if eq and value.strip().lower() in ("none", "null"):
                to_none.append((name[len("--config."):], value))
                continue
        elif name.startswith("--") and not name.startswith("--config"):
            arg = name.replace("-", "_").replace("__", "--", 1) + eq + value
        out.append(arg)
    return out, to_none


def _set_none(config: Any, keys: list[tuple[str, str]]) -> None:
    import dataclasses
    import typing

    for key, text in keys:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = getattr(node, part)
        field = next(f for f in dataclasses.fields(node) if f.name == leaf)
        if field.type is str:
            setattr(node, leaf, text)  # a string key takes the text as written
        elif type(None) in typing.get_args(field.type):
            setattr(node, leaf, None)
        else:
            raise ConfigError(f"--config.{key}={text}: this key cannot be None")


def _flag_error(e: BaseException) -> str:
    text = str(e).strip().strip('"')
    return " ".join(text.split("\n")[0].split()) or type(e).__name__


def _help_text(fv: flags.FlagValues, prog: str, doc: str, run_config: bool,
               full: bool) -> str:
    lines = [doc.strip(), "", f"usage: {prog} [flags]"]
    own = fv.get_help(include_special_flags=False).strip()
    if own:
        lines += ["", "flags:", own]
    lines += ["", "  --flagfile=FILE: read more arguments from FILE"]
    if run_config:
        lines += ["  --config=FILE[:ARG]: a config file (configs/*.py)",
                  "  --config.KEY=VALUE: override one key" + (
                      "" if full else " (--helpfull lists them all)")]
        if full:
            from dice_jax.config import RunConfig
            from dice_jax.settings import describe_settings

            lines += ["", "config keys (default; help):"]
            lines += [f"  --config.{key}={value!r}  {text}".rstrip()
                      for key, value, text in describe_settings(RunConfig())]
    return "\n".join(lines)


def run_main(body: Callable[[flags.FlagValues, list[str]], int | None],
             argv: Sequence[str] | None, prog: str, doc: str,
             define: Callable[[flags.FlagValues], None] | None = None,
             run_config: bool = False) -> int:
    """Parses, runs `body(flags, positional)` and maps errors to exit codes: 0 done (or
    help), 2 with one `error:` line on stderr for bad input (ConfigError, DiceError), an
    error's own `exit_code` with a `stopped:` line (SIGTERM: 143)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        fv, positional = parse_command_line(argv, prog, doc, define, run_config)
        code = body(fv, positional)
    except HelpRequested as e:
        print(e)
        return 0
    except DiceError as e:
        code = getattr(e, "exit_code", 2)
        print(f"{'error' if code == 2 else 'stopped'}: {e}", file=sys.stderr)
        return code
    return 0 if code is None else int(code)


def config_of(fv: flags.FlagValues) -> Any:
    """The run config of a parsed command line (overrides applied, not yet validated)."""
    return fv["config"].value
