"""What the `jaxtag` commands share: argument types, the input options, error handling, the
resumable result-file runs and the train extra's check.

Every command runs its body in `guarded`: bad input, a full disk or an unwritable path is one
line `jaxtag CMD: MESSAGE` and exit 2, Ctrl-C one line and exit 130, a closed stdout (`| head`)
exit 141 without a word. `run_to_files` holds every result file's lock (`ResultFile.locked`,
`fileio.exclusive_lock`) for the whole run and reads them all (`inspect`) before it writes any."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from jaxtag import audio, scoring
from jaxtag.errors import JaxtagError

if TYPE_CHECKING:
    from jaxtag.api import Tagger
    from jaxtag.result_files import ResultFile

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `yes | head -1` gives for `yes`
TRAIN_EXTRA = ("tensorflow", "tensorflow_datasets", "ml_collections", "absl", "sklearn", "clu")
"""Modules of `pip install 'jaxtag[train]'` (pyproject.toml) that training, evaluation and dataset
building import; the core install (the `jaxtag` commands) has none of TensorFlow's."""
CHECKPOINT_HELP = (
    "the model: a checkpoint directory, a training workdir (its best step), a PyTorch .pth "
    "file, or 'ponswon' (the paper's released weights, downloaded once)"
)


def positive_int(text: str) -> int:
    """argparse type shared by the commands: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def require_train_extra(command: str) -> None:
    """Exits with one line naming the install command when the train extra is missing."""

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: imported before and blocked (None)
            return False

    missing = [m for m in TRAIN_EXTRA if not installed(m)]
    if missing:
        raise SystemExit(
            f"{command}: {', '.join(missing)} not installed; training, evaluation and dataset "
            "building need the train extra: pip install 'jaxtag[train]'"
        )


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The inputs, checkpoint and batching options that `tag` and `embed` share."""
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="FILE_OR_DIR",
        help=f"audio files ({', '.join(e[1:] for e in audio.AUDIO_EXTENSIONS)}) or directories "
        "(searched recursively)",
    )
    parser.add_argument(
        "--files-from",
        metavar="LIST",
        help="also process the paths in LIST, one a line ('-': stdin)",
    )
    add_model_arguments(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --batch-size, --engine and --precision (`tag`, `embed`, `serve`)."""
    parser.add_argument("--checkpoint", required=True, metavar="SRC", help=CHECKPOINT_HELP)
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="windows per model call (default 16)"
    )
    parser.add_argument(
        "--engine",
        choices=scoring.ENGINES,
        default="auto",
        help="what runs the model: jax (jitted, any device), onnx (onnxruntime on the CPU, no "
        "compilation; needs pip install 'jaxtag[export]'), openvino (OpenVINO on the CPU; needs "
        "pip install 'jaxtag[openvino]'), auto (default: when JAX has only the CPU, the fastest "
        "installed engine, measured once for this machine, model, precision and batch size; "
        "else jax)",
    )
    parser.add_argument(
        "--precision",
        choices=scoring.PRECISIONS,
        default="float32",
        help="float32 (default, exact) or bfloat16: the chip's native bf16 (CPU: AVX512-BF16 "
        "or AMX, with jax or openvino; refused on a CPU without it), probabilities within 5e-3",
    )


def input_paths(args: argparse.Namespace, command: str) -> list[str]:
    """The files that the inputs and --files-from name (directories expanded); says on stderr
    how many files of the directories were not audio, and of which kinds."""
    skipped: list[str] = []
    paths = scoring.expand_inputs(args.inputs, args.files_from, skipped)
    if not paths:
        raise scoring.InputError("no input files (give files, directories or --files-from LIST)")
    summary = scoring.skipped_summary(skipped)
    if summary:
        print(f"{command}: {summary}", file=sys.stderr)
    return paths


def guarded(
    command: str,
    body: Callable[[], int],
    interrupted: str = "interrupted; rerun the same command to continue",
    decodes: bool = False,
) -> int:
    """Runs a command's body: bad input is one line `COMMAND: MESSAGE` and exit code 2; Ctrl-C
    is one line `COMMAND: INTERRUPTED` and exit 130 (also when a library turned it into an error
    of its own: pybind11 makes an ImportError of one during a module's import); a closed stdout
    ends quietly (exit 141). A body that `decodes` audio runs with the decoders' chatter kept
    off the terminal (jaxtag/cli/decoder_noise.py)."""
    from jaxtag.cli.decoder_noise import filtered
    from jaxtag.cli.interrupts import INTERRUPTED

    try:
        with filtered() if decodes else contextlib.nullcontext():
            code = body()
        sys.stdout.flush()  # here, not at exit: a reader gone (`| head -3`) is a quiet 141
        return code
    except KeyboardInterrupt:
        pass
    except Exception as err:
        if INTERRUPTED.is_set():
            pass
        elif isinstance(err, BrokenPipeError):
            return quiet_broken_pipe()
        elif isinstance(err, JaxtagError | OSError):
            print(f"{command}: {describe_error(err)}", file=sys.stderr)
            return 2
        else:
            raise
    print(f"\n{command}: {interrupted}", file=sys.stderr)
    return 130


def describe_error(err: BaseException) -> str:
    """An error as the commands print it: an OSError as `FILE: what happened` (`[Errno 28]
    ...` reads worse), a JaxtagError as its message."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        other = f" -> {err.filename2}" if err.filename2 is not None else ""
        return f"{err.filename}{other}: {err.strerror}"
    return str(err)


def check_outputs(outputs: Iterable[str | None], inputs: Iterable[str]) -> None:
    """`fileio.check_outputs` on the outputs given (None: an option not given), before any work."""
    from jaxtag.fileio import check_outputs as check

    check([o for o in outputs if o], [i for i in inputs if i])


def quiet_broken_pipe() -> int:
    """The reader of stdout went away (`jaxtag tag ... | head -1`): stop quietly, as `cat` would.

    stdout is pointed at /dev/null so that Python's flush at exit raises nothing more.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def run_to_files(
    tagger: Tagger,
    paths: list[str],
    outputs: list[ResultFile],
    output: str,
    command: str,
) -> int:
    """Scores `paths` (`output`: "probabilities" or a layer) into resumable result files,
    skipping files they already hold; lists unreadable files with the reason. Returns the exit
    code (1 if a file failed). Every output is locked for the whole run and every existing one
    recognised (`inspect`) before any is changed."""
    with contextlib.ExitStack() as locks:
        for out in outputs:
            locks.enter_context(out.locked())
        for out in outputs:
            out.inspect()  # a file that is not this run's stops the run before anything is written
        done = [out.done() for out in outputs]
        todo = [p for p in paths if not all(p in d for d in done)]
        windows = any(out.needs_windows for out in outputs)
        failed = 0
        for result in tagger.score(todo, output, windows, progress=sys.stderr.isatty()):
            if result.error:
                failed += 1
                print(f"{command}: error: {result.error}", file=sys.stderr)
                continue
            for out, already in zip(outputs, done, strict=True):
                if result.path not in already:
                    out.write(result.record())
        for out in outputs:
            out.finish()
    names = ", ".join(str(out.path) for out in outputs)
    skipped = len(paths) - len(todo)
    print(
        f"{command}: {len(todo) - failed} files written to {names}"
        + (f", {skipped} already there" if skipped else "")
        + (f"; {failed} files could not be processed (listed above)" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0
