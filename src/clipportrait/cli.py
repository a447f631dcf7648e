"""The single entry point: ``python run.py task=<name> [overrides]`` (also ``clipportrait ...``).

Before Hydra starts, the command line is composed once against the typed schema ("preflight"), so
a misspelt key, a wrong type or an unknown option stops the run with one paragraph that names the
key, what was given and what is allowed — instead of a traceback after minutes of work.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any, Sequence

CONF_DIR = Path(os.environ.get("CLIPPORTRAIT_CONF", Path(__file__).resolve().parents[2] / "conf"))

# Hydra flags that take a value (all other flags stand alone).
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}


class ConfigProblem(Exception):
    """A command line that does not compose; ``str()`` is the one-paragraph message."""


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra flags (kept for Hydra) from key=value overrides (checked by preflight)."""
    flags, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg in _FLAGS_WITH_VALUE:
            flags.append(arg)
            nxt = next(it, None)
            if nxt is not None:
                flags.append(nxt)
        elif arg.startswith("-"):  # overrides never start with '-' (they may with '+' or '~')
            flags.append(arg)
        else:
            overrides.append(arg)
    return flags, overrides


def _variants(overrides: list[str]) -> list[list[str]]:
    """Override lists to compose: every sweep value appears in at least one list."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    base, sweeps = [], []
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if not values:
                continue
            base.append(values[0])
            sweeps.append((i, values))
        else:
            base.append(overrides[i])
    variants = [base]
    for i, values in sweeps:
        for v in values[1:]:
            variant = list(base)
            variant[i] = v
            variants.append(variant)
    return variants


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def compose_config(overrides: Sequence[str] = ()):
    """The typed config (dataclass instances) that ``python run.py <overrides>`` runs its task with,
    for notebooks and scripts that call the tasks' pieces directly; ``ConfigProblem`` as ``run.py``'s
    preflight words it."""
    from omegaconf import OmegaConf

    from .config import register_configs

    register_configs()
    overrides = list(overrides)
    try:
        cfg = _compose(overrides)
    except Exception as err:
        raise ConfigProblem(_explain(err, overrides)) from err
    _check_task(cfg)
    return OmegaConf.to_object(cfg)


def _omegaconf_cause(err: BaseException):
    from omegaconf.errors import OmegaConfBaseException

    seen = err
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_TYPE_NAMES = {"IntegerNode": "an integer", "FloatNode": "a number", "BooleanNode": "true/false",
               "StringNode": "a string", "AnyNode": "any value", "EnumNode": "one of the enum values"}


def _describe_expected(node: Any) -> str:
    from omegaconf import DictConfig, ListConfig

    if node is None:
        return "a value of the schema's type"
    if isinstance(node, DictConfig):
        return "a mapping"
    if isinstance(node, ListConfig):
        return "a list, e.g. [a,b]"
    name = type(node).__name__
    text = _TYPE_NAMES.get(name, name)
    if getattr(node, "_is_optional", lambda: False)():
        text += " or null"
    return text


def _explain(err: BaseException, variant: list[str]) -> str:
    """Turn a composition failure into one paragraph naming key, value and what is allowed."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    if isinstance(err, OverrideParseException):
        return f"cannot parse the command line: {err}"
    if isinstance(err, MissingConfigException):
        missing = str(getattr(err, "missing_cfg_file", "") or "")
        group, _, option = missing.rpartition("/")
        options = [o for o in (getattr(err, "options", None) or []) if not o.endswith("_schema")]
        if group and options:
            close = difflib.get_close_matches(option, options, n=1, cutoff=0.5)
            hint = f" Did you mean {group}={close[0]}?" if close else ""
            return (f"'{option}' is not an option of the config group '{group}'.{hint} "
                    f"Available: {', '.join(sorted(options))}. Run `python run.py --help` for all groups.")
        return " ".join(str(err).split())
    cause = _omegaconf_cause(err)
    full_key = getattr(cause, "full_key", None) if cause is not None else None
    if cause is None or not full_key:
        return " ".join(str(err).split())
    offending = [o for o in variant if (k := o.lstrip("+~").split("=", 1)[0]) == full_key or k.startswith(full_key + ".")]
    given = offending[0].split("=", 1)[1] if offending and "=" in offending[0] else None
    # Compose without the offending override to see what the schema allows at that place.
    try:
        base = _compose([o for o in variant if o not in offending])
    except Exception:  # the rest does not compose either; report what we know
        base = None
    parent_key, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(base, parent_key) if (base is not None and parent_key) else base
    if isinstance(cause, ValidationError) and not isinstance(cause, ConfigKeyError):
        node = parent._get_node(leaf) if isinstance(parent, DictConfig) else None
        where = f" (a field of {OmegaConf.get_type(parent).__name__})" if isinstance(parent, DictConfig) else ""
        return (f"wrong type for '{full_key}'{where}: got {given!r}, expected {_describe_expected(node)}. "
                f"Fix the override '{offending[0] if offending else full_key}'.")
    allowed = sorted(str(k) for k in parent.keys()) if isinstance(parent, DictConfig) else []
    close = difflib.get_close_matches(leaf, allowed, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr((parent_key + '.' if parent_key else '') + c) for c in close)}?" if close else ""
    where = f"under '{parent_key}'" if parent_key else "at the top level"
    return (f"unknown config key '{full_key}'{' (from ' + repr(offending[0]) + ')' if offending else ''}.{hint} "
            f"Allowed keys {where}: {', '.join(allowed) or '(none)'}. "
            f"Run `python run.py --help` for groups and options, or add `--cfg job` to print the composed config.")


def preflight(overrides: list[str]) -> None:
    """Compose every sweep variant of the command line; raise ConfigProblem on the first failure."""
    from .config import register_configs

    register_configs()
    try:
        variants = _variants(overrides)
    except Exception as err:  # syntax errors in overrides
        raise ConfigProblem(f"cannot parse the command line: {' '.join(str(err).split())}") from err
    for variant in variants:
        try:
            cfg = _compose(variant)
        except Exception as err:
            raise ConfigProblem(_explain(err, variant)) from err
        _check_task(cfg)


def _check_task(cfg) -> None:
    """What composition lets through but the schema does not mean: unknown tasks, `+key` extras."""
    from dataclasses import fields

    from .config import Config
    from .tasks import TASKS

    extra = sorted(set(cfg.keys()) - {f.name for f in fields(Config)})
    if extra:
        raise ConfigProblem(f"unexpected top-level key(s) {', '.join(map(repr, extra))}: nothing reads them. "
                            f"Allowed: {', '.join(f.name for f in fields(Config))}.")
    name = cfg.task.get("name") if "task" in cfg else None
    if name not in TASKS:
        raise ConfigProblem(f"task.name={name!r} is not a task; available: {', '.join(TASKS)}.")


def print_help() -> None:
    from .tasks import TASKS, load_task

    lines = [
        "clipportrait: text- and 3D-controllable portrait generators from unlabelled face photos.",
        "",
        "usage:  python run.py task=<task> [group=option ...] [key=value ...] [--cfg job]",
        "        python run.py -m task=<task> key=a,b [launcher=submitit_local|slurm]   (sweeps)",
        "",
        "tasks (task=...):",
    ]
    for name in TASKS:
        lines.append(f"  {name:18s} {getattr(load_task(name), 'DESCRIPTION', '')}")
    lines += ["", "config groups (group=option):"]
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name:18s} {', '.join(options)}")
    lines += [
        "",
        "Any key can be overridden (trainer.max_steps=500); misspelt keys and wrong types are refused",
        "before work starts. `--cfg job` prints the composed config; --hydra-help shows Hydra's flags.",
        "Docs: README.md.",
    ]
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return 0
    flags, overrides = split_argv(argv)
    try:
        preflight(overrides)
    except ConfigProblem as problem:
        print(f"clipportrait: config error: {problem}", file=sys.stderr)
        return 2
    from .runner import hydra_entry

    sys.argv = [sys.argv[0] if sys.argv else "run.py", *flags, *overrides]
    hydra_entry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
