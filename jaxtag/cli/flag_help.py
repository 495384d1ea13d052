"""`--help` of the absl commands (`jaxtag-train`, `jaxtag-eval`): the command's own flags first.

absl's own `--help` lists only the flags of the `__main__` module, which for a console script
(`.venv/bin/jaxtag-train`) or `run_train.py` defines none ("Try --helpfull"), and `--helpfull`
starts with absl's logging flags. `CommandHelp.exit_if_asked` runs first in the command's
`flags_parser` (`app.run(main, flags_parser=...)`): on `--help`, `-h`, `-?` or `--helpshort` it
prints the flags the command's module defines (required ones first, each with its help and
default), the command's examples and notes, a pointer to absl's flags and the docs page, and
exits 0 before absl parses anything: no required-flag error, no config loaded, no JAX imported.
`--helpfull` stays absl's full listing; `describe()` is its preamble (the `__main__` docstring
absl prints, which the command's `run` sets).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType

from absl import flags

HELP_ARGS = frozenset({"-h", "--h", "-help", "--help", "-?", "--?", "-helpshort", "--helpshort"})
"""What asks for the command's help: absl's spellings of --help / --helpshort, and -h."""
ABSL_POINTER = "absl's own flags (--verbosity, --logtostderr, --flagfile, ...): --helpfull"
EXIT_BROKEN_PIPE = 141  # as jaxtag.cli.common: `jaxtag-train --help | head`


def wants_help(argv: Sequence[str]) -> bool:
    """Whether `argv` (argv[0] the program) asks for help, before a `--` that ends the flags."""
    for arg in argv[1:]:
        if arg == "--":
            return False
        if arg in HELP_ARGS:
            return True
    return False


def module_flags(module: ModuleType, flag_values: flags.FlagValues = flags.FLAGS) -> list:
    """The flags `module` defines, in definition order. absl files them under the module's id
    too, which holds whatever its name (`__main__` under `python -m`, a package name otherwise)."""
    return list(flag_values.flags_by_module_id_dict().get(id(module), []))


def flag_term(flag: flags.Flag, metavar: str | None = None) -> str:
    """How a flag is written on the command line: `--[no]NAME`, `--NAME {a,b}`, `--NAME METAVAR`
    (as argparse, the flag's name in capitals when no metavar is given)."""
    if flag.boolean:
        return f"--[no]{flag.name}"
    choices = getattr(flag.parser, "enum_values", None)
    if choices:
        return f"--{flag.name} {{{','.join(choices)}}}"
    return f"--{flag.name} {metavar or flag.name.upper()}"


def flag_text(flag: flags.Flag, required: bool) -> str:
    """The flag's help, its default (or "required") after it; without the `<a|b>: ` that absl
    puts before an enum flag's help (the term shows the choices)."""
    text = (flag.help or "").strip()
    choices = getattr(flag.parser, "enum_values", None)
    if choices and text.startswith(f"<{'|'.join(choices)}>: "):
        text = text[len("|".join(choices)) + 4 :]
    if required:
        return f"{text} (required)"
    if flag.default is not None and flag.default != "":
        default = str(flag.default).lower() if flag.boolean else str(flag.default)
        return f"{text} (default: {default})"
    return text


def help_width() -> int:
    """argparse's width (the terminal's, 80 columns when not a terminal), within 60..100."""
    return max(60, min(shutil.get_terminal_size().columns - 2, 100))


def format_entries(entries: Sequence[tuple[str, str]], width: int) -> list[str]:
    """argparse's two-column layout: each term, its help beside it (or below a long term)."""
    column = min(max(len(term) for term, _ in entries) + 4, 26)
    lines = []
    for term, text in entries:
        wrapped = textwrap.wrap(
            text, max(width - column, 20), break_long_words=False, break_on_hyphens=False
        ) or [""]
        if len(term) + 4 <= column:
            lines.append(f"  {term.ljust(column - 2)}{wrapped[0]}".rstrip())
            wrapped = wrapped[1:]
        else:
            lines.append(f"  {term}")
        lines.extend(" " * column + line for line in wrapped)
    return lines


def fill_paragraphs(text: str, width: int) -> list[str]:
    """`text`'s paragraphs (blank-line separated), each refilled to `width`."""
    paragraphs = [" ".join(p.split()) for p in textwrap.dedent(text).strip().split("\n\n")]
    lines: list[str] = []
    for paragraph in filter(None, paragraphs):
        if lines:
            lines.append("")
        lines += textwrap.wrap(paragraph, width, break_long_words=False, break_on_hyphens=False)
    return lines


@dataclass(frozen=True)
class CommandHelp:
    """The help of one absl command: its module's flags, examples, notes and docs page."""

    prog: str  # jaxtag-train
    module: ModuleType  # the module whose flags are the command's own
    summary: str  # one line
    required: Sequence[str]  # the flags marked required, listed first
    examples: Sequence[str]  # one command line each
    docs: str  # the page documenting the command: docs/training.md
    notes: str = ""  # paragraphs after the examples
    usage_extra: str = ""  # after the required flags in the usage line
    metavars: dict[str, str] = field(default_factory=dict)  # flag name -> its value's name
    # Entries shown right after a flag: (term, help), e.g. --config.FIELD=VALUE after --config.
    after: dict[str, Sequence[tuple[str, str]]] = field(default_factory=dict)

    def own_flags(self, flag_values: flags.FlagValues = flags.FLAGS) -> list:
        """The module's flags, the required ones first (in `required`'s order)."""
        defined = module_flags(self.module, flag_values)
        by_name = {f.name: f for f in defined}
        required = [by_name[name] for name in self.required if name in by_name]
        return required + [f for f in defined if f.name not in self.required]

    def term(self, flag: flags.Flag) -> str:
        return flag_term(flag, self.metavars.get(flag.name))

    def usage(self, flag_values: flags.FlagValues = flags.FLAGS) -> str:
        words = [self.prog]
        words += [self.term(f) for f in self.own_flags(flag_values) if f.name in self.required]
        words += [self.usage_extra, "[flags]"] if self.usage_extra else ["[flags]"]
        return "usage: " + " ".join(words)

    def example_lines(self) -> list[str]:
        title = "example:" if len(self.examples) == 1 else "examples:"
        return [title, *(f"  {line}" for line in self.examples)]

    def docs_line(self) -> str:
        return f"documented in {self.docs}"

    def format(self, flag_values: flags.FlagValues = flags.FLAGS, width: int | None = None) -> str:
        """The whole `--help` text: usage, summary, own flags, examples, notes, pointers."""
        width = width or help_width()
        entries = []
        for flag in self.own_flags(flag_values):
            entries.append((self.term(flag), flag_text(flag, flag.name in self.required)))
            entries.extend(self.after.get(flag.name, ()))
        lines = [self.usage(flag_values), "", self.summary, "", "flags:"]
        lines += format_entries(entries, width)
        lines += ["", *self.example_lines()]
        if self.notes.strip():
            lines += ["", *fill_paragraphs(self.notes, width)]
        lines += ["", ABSL_POINTER, self.docs_line()]
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """The preamble of absl's `--helpfull` (the `__main__` docstring absl prints): all but
        the flags, '%' doubled (absl substitutes sys.argv[0] for '%s' in it)."""
        own = f"{self.prog} --help lists its own flags first."
        parts = [self.summary, own, "\n".join(self.example_lines())]
        if self.notes.strip():
            parts.append("\n".join(fill_paragraphs(self.notes, help_width())))
        parts.append(self.docs_line())
        return "\n\n".join(parts).replace("%", "%%") + "\n"

    def exit_if_asked(self, argv: Sequence[str]) -> None:
        """Prints the help and exits 0 when `argv` asks for it; the first thing a command's
        `flags_parser` does."""
        if not wants_help(argv):
            return
        try:
            sys.stdout.write(self.format())
            sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)
        sys.exit(0)
