"""Convert PyTorch weights to a jaxtag checkpoint: `jaxtag convert SRC OUT_DIR`.

SRC is a `.pth` state dict of the MTSA model (the released `ponswon.pth`, or one a user trained
with the original code), or `ponswon`: the paper's released file, downloaded from the original
repository and verified against its git blob id first. The architecture is read off the tensor
shapes; only the head count, which no shape tells, is a flag.

    jaxtag convert ponswon checkpoints/ponswon
    jaxtag convert my_run.pth checkpoints/mine --tags my_tags.txt

OUT_DIR is checked before SRC is read: an existing one is replaced only with `--overwrite` and
only if it is a jaxtag checkpoint (or empty) that does not hold SRC; its folder must be
writable and have room for about SRC's size. A write that fails (a full disk, Ctrl-C) is one
line; orbax's temporary folder is removed and an old OUT_DIR kept whole.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from jaxtag.cli import common
from jaxtag.errors import JaxtagError

SPACE_MARGIN = 1 << 20  # bytes beyond SRC's size: orbax's metadata and the meta item
SETTLE_SECONDS = 3.0  # at most this long for orbax's threads to stop after a failed write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="a PyTorch state dict file (e.g. ponswon.pth), or 'ponswon' to download it"
    )
    parser.add_argument("out_dir", help="the checkpoint directory to write")
    parser.add_argument(
        "--heads",
        type=common.positive_int,
        default=None,
        help="attention heads (not visible in the weights; default 8, the released model's)",
    )
    parser.add_argument(
        "--tags", help="a file with one tag name per line (default: MTAT top-50 for 50 outputs)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")


def check_out(out: Path, source: str, overwrite: bool) -> None:
    """Refuses, before any work, an OUT_DIR that must not be written (see the module docstring)."""
    from jaxtag.checkpoint import is_model_dir
    from jaxtag.fileio import OutputError, unwritable_reason

    if os.path.lexists(out):
        if not overwrite:
            raise OutputError(f"{out} already exists (pass --overwrite to replace it)")
        if not out.is_dir() or (any(out.iterdir()) and not is_model_dir(out)):
            kind = "directory that holds no jaxtag checkpoint" if out.is_dir() else "file"
            raise OutputError(
                f"{out} is a {kind}; --overwrite replaces only a jaxtag checkpoint, so it was "
                "left untouched (choose another output path)"
            )
        if os.path.exists(source) and Path(source).resolve().is_relative_to(out.resolve()):
            raise OutputError(f"{out} holds the source {source}: write the checkpoint elsewhere")
    problem = unwritable_reason(out.parent / f"{out.name}.new")  # its folder, written beside
    if problem:
        raise OutputError(problem.replace(f"{out.name}.new", out.name))
    if os.path.isfile(source):
        folder = next(p for p in [out, *out.parents] if p.is_dir())
        need, free = os.path.getsize(source) + SPACE_MARGIN, shutil.disk_usage(folder).free
        if free < need:
            raise OutputError(
                f"{out}: not enough free space ({free / 1e6:.1f} MB free in {folder}, the "
                f"checkpoint needs about {need / 1e6:.1f} MB)"
            )


def _orbax_temporaries(out: Path) -> set[Path]:
    return set(map(Path, glob.glob(glob.escape(str(out)) + ".orbax-checkpoint-tmp*")))


def _write_failure(err: BaseException) -> str:
    """What went wrong in a failed write, in a few words (tensorstore's errors run for pages
    and carry the OS error code at the end)."""
    from jaxtag.checkpoint import first_line

    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    code = re.search(r"os_error_code='?(\d+)", str(err))
    return os.strerror(int(code.group(1))) if code else first_line(err)


@contextlib.contextmanager
def orbax_write(out: Path) -> Iterator[None]:
    """Runs a checkpoint write with orbax's own reports held back: on success they are printed
    after it; on a failure its background threads are given a moment to stop (they report the
    same error again and again, some after the write has failed), their output is dropped and
    the temporary folder orbax left beside `out` removed. Cleaning up belongs to
    jaxtag/checkpoint.py's save_model, which leaves the folder today."""
    before = _orbax_temporaries(out)
    absl, stderr, held = logging.getLogger("absl"), sys.stderr, io.StringIO()
    level = absl.level
    absl.setLevel(logging.CRITICAL + 1)
    sys.stderr = held
    try:
        yield
    except BaseException as err:

        def activity() -> tuple[int, int]:  # what orbax's threads are still printing or writing
            files = [f for t in _orbax_temporaries(out) - before for f in t.rglob("*")]
            return len(held.getvalue()), sum(f.stat().st_size for f in files if f.is_file())

        deadline, last, quiet = time.monotonic() + SETTLE_SECONDS, None, 0
        while not isinstance(err, JaxtagError) and quiet < 3 and time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # a file removed while it was looked at
                now = activity()
                quiet, last = (quiet + 1 if now == last else 0), now
            time.sleep(0.1)
        for temporary in _orbax_temporaries(out) - before:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    else:
        stderr.write(held.getvalue())
    finally:
        sys.stderr = stderr
        absl.setLevel(level)


def run(args: argparse.Namespace) -> int:
    def body() -> int:
        import jaxtag
        from jaxtag import released
        from jaxtag.convert import describe, read_tags
        from jaxtag.fileio import OutputError

        out = Path(args.out_dir).absolute()
        check_out(out, args.source, args.overwrite)
        tags = read_tags(args.tags) if args.tags else None
        if not os.path.exists(args.source) and released.is_released_name(args.source):
            released.fetch(args.source)  # its progress shown now; convert_weights finds the file
        try:
            with orbax_write(out):
                path, config = jaxtag.convert_weights(
                    args.source, out, args.heads, tags, args.overwrite
                )
        except JaxtagError:
            raise
        except (OSError, ValueError, RuntimeError) as err:  # orbax's and tensorstore's
            raise OutputError(
                f"{out}: cannot write the checkpoint ({_write_failure(err)}); nothing was written"
            ) from err
        print(f"converted {args.source} -> {path}")
        print(f"model: {describe(config)}")
        return 0

    return common.guarded(
        "jaxtag convert", body, "interrupted; the checkpoint is written whole or not at all"
    )
