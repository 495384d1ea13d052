r"""Train the self-attention music tagger: a config (bundled or a file) into a workdir.

Rerunning the same command resumes from the latest checkpoint in --workdir; rerunning a finished
run says so and changes nothing. Every config value is checked before anything is written, and
the workdir is locked for the run: a second jaxtag-train on it stops at once, naming the first's
PID. WORKDIR/train_summary.json adds up the time of every call of a resumed run ("sessions").

Exit codes: 0 done, 2 a bad config, workdir or dataset, or a failed write (disk full), 130
interrupted (Ctrl-C; rerun to resume). Each failure is one line on stderr.

The same command: `python -m jaxtag.cli.train`, or `python run_train.py` from a clone.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import importlib.util
import logging as std_logging
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from jaxtag.cli.common import describe_error, guarded, require_train_extra
from jaxtag.cli.interrupts import INTERRUPTED, exit_now, sigint_handled
from jaxtag.errors import JaxtagError

require_train_extra("jaxtag-train")

from absl import app, flags, logging  # noqa: E402  (after the check: absent in a core install)
from ml_collections import config_flags  # noqa: E402

from jaxtag.cli.flag_help import CommandHelp  # noqa: E402  (imports absl)

FLAGS = flags.FLAGS
INTERRUPTED_LINE = "interrupted; rerun the same command to resume from the last checkpoint"
REQUIRED_FLAGS = ["config", "workdir"]
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
flags.DEFINE_bool(
    "distributed",
    None,
    "Call jax.distributed.initialize() (multi-host). Default: when JAX_COORDINATOR_ADDRESS is set.",
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for a start without a launcher that jax.distributed detects "
    "(with --num_processes and --process_id; implies --distributed).",
)
flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
config_flags.DEFINE_config_file(
    "config",
    None,
    "A bundled config (demo, mtat, mtat:readme, msd) or a config file (configs/mtat.py:readme).",
    lock_config=True,
)
flags.mark_flags_as_required(REQUIRED_FLAGS)
# --help (jaxtag/cli/flag_help.py): these flags, the examples, then the docstring above.
HELP = CommandHelp(
    prog="jaxtag-train",
    module=sys.modules[__name__],
    summary=__doc__.splitlines()[0],
    notes=__doc__.split("\n", 1)[1],
    required=REQUIRED_FLAGS,
    usage_extra="[--config.FIELD=VALUE ...]",
    metavars={
        "config": "NAME_OR_FILE",
        "workdir": "DIR",
        "coordinator_address": "HOST:PORT",
        "num_processes": "N",
        "process_id": "I",
    },
    after={
        "config": [
            (
                "--config.FIELD=VALUE",
                "Override one field of the config, nested ones too (--config.model.dtype="
                "bfloat16); repeatable. The fields are those of the config's get_config() "
                "(configs/common.py holds the shared ones).",
            )
        ]
    },
    examples=[
        "jaxtag-train --config demo --workdir runs/demo",
        "jaxtag-train --config mtat:readme --workdir runs/mtat --config.data_dir ~/tfds",
    ],
    docs="docs/training.md",
)


def configs_dir() -> Path:
    """The bundled configs: ``jaxtag.configs`` when installed, else a clone's ``configs/``."""
    spec = importlib.util.find_spec("jaxtag.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "configs"


def bundled_configs() -> list[str]:
    return sorted(
        p.stem for p in configs_dir().glob("*.py") if p.stem not in ("__init__", "common")
    )


def _load_module(path: Path) -> ModuleType:
    """Executes a config file as a module. A file in a package folder (like configs/) is loaded
    as part of that package, so that it can import its siblings relatively (``from .common``)."""
    package = None
    if (path.parent / "__init__.py").is_file():
        package = "_jaxtag_configs_" + hashlib.sha1(str(path.parent).encode()).hexdigest()[:10]
        if package not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                package, path.parent / "__init__.py", submodule_search_locations=[str(path.parent)]
            )
            sys.modules[package] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[package])
    name = f"{package}.{path.stem}" if package else f"_jaxtag_config_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> Any:
    """``--config``'s value: ``NAME[:ARG]`` (a bundled config) or ``FILE.py[:ARG]``; returns
    ``get_config(ARG)`` (``get_config()`` without ``:ARG``)."""
    name, colon, arg = spec.partition(":")
    if name.endswith(".py") or "/" in name or os.sep in name:
        path = Path(os.path.expanduser(name))
        if not path.is_file():
            raise FileNotFoundError(f"config file {name} does not exist")
    elif name in bundled_configs():
        path = configs_dir() / f"{name}.py"
    else:
        raise ValueError(
            f"unknown config {name!r}: bundled configs are {', '.join(bundled_configs())}; "
            "or give a config file (path/to/config.py)"
        )
    module = _load_module(path.resolve())
    return module.get_config(*([arg] if colon else []))


class ConfigParser(flags.ArgumentParser):
    """The ``--config`` flag's parser: :func:`load_config`, then the config is locked."""

    def parse(self, argument: str) -> Any:
        config = load_config(argument)
        config.lock()
        return config

    def flag_type(self) -> str:
        return "config object"


FLAGS["config"].parser = ConfigParser()


def unknown_override(config: Any, argv: list[str]) -> str | None:
    """The first ``--config.PATH`` in ``argv`` naming no field of ``config``, as a message."""
    for arg in argv:
        match = re.match(r"--?config\.([\w.]+)", arg)
        if not match:
            continue
        node, walked = config, []
        for part in match.group(1).split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if part not in fields:
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" (did you mean {'.'.join([*walked, close[0]])}?)" if close else ""
                field = ".".join([*walked, part])
                return f"--config.{match.group(1)}: the config has no field {field}{hint}"
            node, walked = node[part], [*walked, part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, every mistake reported in one line (exit 2). ml_collections raises a
    KeyError or AttributeError from deep inside for a ``--config.FIELD`` that does not exist.
    ``--help`` (``-h``) is answered first, by `HELP`: the command's own flags, then examples."""
    HELP.exit_if_asked(argv)
    try:
        return FLAGS(argv)
    except flags.Error as err:
        message = str(err)
    except (KeyError, AttributeError):
        spec = next(
            (a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
             if re.fullmatch(r"--?config(=.*)?", a) and ("=" in a or i + 1 < len(argv))),
            None,
        )  # fmt: skip
        message = unknown_override(load_config(spec), argv) if spec else None
        if message is None:
            raise
    print(f"run_train: {message}", file=sys.stderr)
    sys.exit(2)


def initialize_distributed(
    distributed: bool | None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when asked (or when JAX_COORDINATOR_ADDRESS is set).

    Under SLURM, Open MPI or on Cloud TPU, JAX finds the coordinator and the process index
    itself; elsewhere (two hosts started by hand) the three values name them.
    """
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    if given and len(given) != len(explicit):
        missing = sorted(set(explicit) - set(given))
        raise ValueError(f"--{' and --'.join(missing)} must be given with --{next(iter(given))}")
    if distributed is None:
        distributed = bool(given) or "JAX_COORDINATOR_ADDRESS" in os.environ
    if not distributed:
        return False
    import jax

    jax.distributed.initialize(**given)
    return True


class _BackgroundSaveErrors(std_logging.Filter):
    """orbax logs a failed background save with its traceback before the main thread sees it;
    the main thread then reports it in one line (jaxtag.train.evaluate_and_save)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno < std_logging.ERROR:
            return True
        path = record.pathname.replace(os.sep, "/")
        # asyncio's "Task/Future exception was never retrieved": orbax's write tasks (jaxtag
        # itself runs no asyncio), each failed array write once more after the save failed.
        orphan = record.name == "asyncio" and "exception was never retrieved" in record.getMessage()
        return not ("/orbax/" in path or orphan)


def quiet_background_errors() -> None:
    """Keeps what background threads print after a failed write off the terminal: orbax's error
    logs and tensorstore's "Event loop is closed" callbacks (printed as unraisable errors)."""
    # On the handler: asyncio's records reach it from their own logger, not through absl's.
    logging.get_absl_handler().addFilter(_BackgroundSaveErrors())
    hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        value = info.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            hook(info)

    sys.unraisablehook = unraisable


def train_command(config: Any, workdir: str, distributed: bool | None = None, **launch: Any) -> int:
    """Trains `config` in `workdir` (`distributed`, `launch`: as `initialize_distributed`
    takes them); returns the exit code, each failure one line on stderr as for every jaxtag
    command (`jaxtag.cli.common.guarded`: 2 bad input or a failed write, 130 interrupted)."""
    from jaxtag import runtime, train

    def body() -> int:
        try:
            initialize_distributed(distributed, **launch)
            runtime.enable_compilation_cache()
            train.train_and_evaluate(config, workdir)
        except ValueError as err:  # also the data pipeline's and ModelConfig's, in their words
            if isinstance(err, JaxtagError):
                raise
            raise JaxtagError(first_line(err)) from err
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            hint = "; free some space, then rerun the same command to resume"
            raise JaxtagError(describe_error(err) + hint) from err
        return 0

    INTERRUPTED.clear()
    with sigint_handled():
        return guarded("run_train", body, interrupted=INTERRUPTED_LINE)


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save step at INFO
        logging.set_verbosity(logging.WARNING)
        quiet_background_errors()
    return train_command(
        FLAGS.config,
        os.path.expanduser(FLAGS.workdir),
        distributed=FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )


def run() -> None:
    """The ``jaxtag-train`` console script (``--help``: `HELP`; ``--helpfull``: absl's listing
    of every flag after `HELP`'s text)."""
    sys.modules["__main__"].__doc__ = HELP.describe()
    try:
        app.run(main, flags_parser=parse_flags)
    except SystemExit as done:
        if done.code == 130:  # interrupted: exit now, as the jaxtag commands do (cli/__init__.py)
            exit_now(130)
        raise


if __name__ == "__main__":
    run()
