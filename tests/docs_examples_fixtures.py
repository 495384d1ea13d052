"""What tests/test_docs_examples.py reads and runs: the fenced blocks of the documentation, the
commands their shell blocks call (with the flags those name, checked against the parsers), and the
scratch folder the examples run in.

    blocks, problems = fenced_blocks(text, "README.md")  # Block: doc, line, lang, code, no_run
    commands = shell_commands(block.code, block.first_line)  # Command: program, args, line
    problems = flag_problems(command, known_flags())  # one line per unknown flag

A block preceded, on the line just before its opening fence, by `<!-- no-run: REASON -->` is not
run (it needs MTAT/MSD, a GPU, several hosts, the network, pip, or many minutes); it is still
checked for syntax and flags. Nothing here is imported by jaxtag; heavy imports stay in functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
NO_RUN = re.compile(r"^\s*<!--\s*no-run:(.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)[^`]*$")
SHELLS = {"bash"}
PYTHON = {"python"}
NOT_RUN = {"", "text", "json", "jsonl", "csv", "toml", "yaml", "ini", "html", "diff"}
"""Fence languages that show outputs or files: never run (a shell block must say ```bash)."""
AUDIO_NAME = re.compile(r"(?<![\w/.~:-])((?:~/)?[\w./-]*\w\.(?:wav|mp3|flac|ogg))\b")


@dataclasses.dataclass(frozen=True)
class Block:
    doc: str  # the document's path relative to the repository
    line: int  # the 1-based line of the opening fence
    lang: str
    code: str
    no_run: str | None  # the REASON of a no-run mark, or None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def first_line(self) -> int:
        """The document line of the block's first line of code."""
        return self.line + 1

    @property
    def runnable(self) -> bool:
        return self.no_run is None and self.lang in SHELLS | PYTHON


def fenced_blocks(text: str, doc: str) -> tuple[list[Block], list[str]]:
    """The fenced code blocks of a Markdown text in order, and its problems: a fence never
    closed, a no-run mark that is not on the line just before an opening fence or gives no
    reason. The code of an indented fence (in a list item) loses that indentation."""
    blocks, problems = [], []
    lines = text.splitlines()
    opened = None  # (line index, indent, fence, lang, no_run)
    body: list[str] = []
    for i, line in enumerate(lines):
        if opened is None:
            match = FENCE.match(line)
            mark = NO_RUN.match(lines[i - 1]) if i else None
            if match:
                reason = mark.group(1).strip() if mark else None
                if mark and not reason:
                    problems.append(f"{doc}:{i}: a no-run mark gives no reason")
                opened = (i, match["indent"], match["fence"], match["lang"].lower(), reason)
                body = []
            elif NO_RUN.match(line) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
                problems.append(f"{doc}:{i + 1}: a no-run mark not on the line before a fence")
            continue
        start, indent, fence, lang, reason = opened
        stripped = line.strip()
        if stripped.startswith(fence) and not stripped.strip(fence[0]):
            code = "".join(f"{b.removeprefix(indent)}\n" for b in body)
            blocks.append(Block(doc, start + 1, lang, code, reason))
            opened = None
        else:
            body.append(line)
    if opened is not None:
        problems.append(f"{doc}:{opened[0] + 1}: a fence never closed")
    return blocks, problems


# ----------------------------------------------------------------------------------------------
# The commands of a shell block

PROGRAMS = {"jaxtag", "jaxtag-train", "jaxtag-eval", "jaxtag-build"}
SCRIPTS = {"run_train.py": "jaxtag-train", "run_eval.py": "jaxtag-eval"}
MODULES = {
    "jaxtag": "jaxtag",
    "jaxtag.cli": "jaxtag",
    "jaxtag.cli.train": "jaxtag-train",
    "jaxtag.cli.evaluate": "jaxtag-eval",
    "data_prep.build": "jaxtag-build",
    "jaxtag.data_prep.build": "jaxtag-build",
    "data_prep.synth": "synth",
    "jaxtag.data_prep.synth": "synth",
}
LAUNCHERS = {"mpirun", "mpiexec", "srun", "timeout", "env", "nohup", "time", "exec", "xargs"}
COMMAND_STRING = re.compile(r"(^|\s)(jaxtag[\w-]*|python3?|\S*run_(train|eval)\.py)(\s|$)")
SEPARATORS = {";", "&&", "||", "|", "&", "|&", "(", ")", ";;", "{", "}"}
NOT_IN_A_TEST = {
    "pip": "installs packages (the network)",
    "pip3": "installs packages (the network)",
    "python -m pip": "installs packages (the network)",
    "python -m venv": "creates a virtual environment",
    "make": "make targets set up environments and run for minutes",
    "mpirun": "starts processes on several hosts",
    "mpiexec": "starts processes on several hosts",
    "srun": "needs a SLURM cluster",
    "gcloud": "needs a cloud TPU",
    "sudo": "needs root",
    "apt": "installs packages (the network)",
    "apt-get": "installs packages (the network)",
    "git": "needs a repository or the network",
    "wget": "the network",
    "ssh": "another host",
    "docker": "needs docker",
    "conda": "installs packages (the network)",
    "uv": "installs packages (the network)",
}
"""Programs that a runnable block must not call: such a block needs `<!-- no-run: REASON -->`."""


@dataclasses.dataclass(frozen=True)
class Command:
    program: str  # "jaxtag", "jaxtag-train", ..., "synth", or the word called ("make", "curl")
    args: tuple[str, ...]  # what follows the program (for `python -m X`, what follows X)
    line: int  # the document line the command starts on
    word: str = ""  # the program as called (.venv/bin/jaxtag, python3)


def _logical_lines(code: str, first_line: int) -> list[tuple[int, str]]:
    """The block's lines with backslash continuations joined, each with its document line."""
    out, pending, start = [], "", first_line
    for number, line in enumerate(code.splitlines(), first_line):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def _without_synopsis_brackets(line: str) -> str:
    """`[--engine auto|jax|onnx]` -> ` --engine auto jax onnx `: a synopsis's optional parts
    read as arguments (for the flag check only; runnable blocks have none)."""
    return re.sub(r"\[(\s*-[^\[\]]*)\]", lambda m: " " + m.group(1).replace("|", " ") + " ", line)


def shell_commands(code: str, first_line: int = 1) -> list[Command]:
    """The simple commands of a bash block (separated by newlines, `;`, `&&`, `||`, `|`, `&`),
    quoted command strings (`--command "cd x && python run_train.py ..."`) included; the words
    after a launcher (mpirun, srun, timeout, env, ...) are searched for the program it starts."""
    commands = []
    for number, line in _logical_lines(code, first_line):
        lexer = shlex.shlex(_without_synopsis_brackets(line), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:  # an unclosed quote: `bash -n` reports it
            continue
        simple: list[str] = []
        redirected = False
        for word in [*words, ";"]:
            if word in SEPARATORS:
                commands.extend(_command(simple, number))
                simple, redirected = [], False
            elif re.fullmatch(r"[<>&]+", word):  # a redirection: 2>&1 reads as 2, >&, 1
                if simple and simple[-1].isdigit():
                    simple.pop()
                redirected = True
            elif redirected:
                redirected = False  # the redirection's file
            else:
                simple.append(word)
                if re.search(r"\s", word) and COMMAND_STRING.search(word):
                    commands.extend(shell_commands(word, number))  # a quoted command line
    return commands


def _command(words: list[str], line: int) -> list[Command]:
    """The command of a simple command's words, and for a launcher (mpirun, srun, timeout,
    env, ...) also the program it starts."""
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words:
        return []
    found = [_program_at(words, 0, line)]
    if os.path.basename(words[0]) in LAUNCHERS:
        for i in range(1, len(words)):
            inner = _program_at(words, i, line)
            if inner.program in PROGRAMS | {"synth"} or inner.program.startswith("python"):
                found.append(inner)
                break
    return found


def _program_at(words: list[str], i: int, line: int) -> Command:
    base = os.path.basename(words[i])
    rest = words[i + 1 :]
    if re.fullmatch(r"python(3(\.\d+)?)?", base):
        if rest and os.path.basename(rest[0]) in SCRIPTS:
            return Command(SCRIPTS[os.path.basename(rest[0])], tuple(rest[1:]), line, words[i])
        if len(rest) >= 2 and rest[0] == "-m":
            program = MODULES.get(rest[1], f"python -m {rest[1]}")
            return Command(program, tuple(rest[2:]), line, words[i])
        return Command("python", tuple(rest), line, words[i])
    return Command(base, tuple(rest), line, words[i])


# ----------------------------------------------------------------------------------------------
# The flags each program defines


@dataclasses.dataclass(frozen=True)
class ArgparseSpec:
    options: dict[str, tuple[bool, str]]  # option string -> (takes a value, dest)
    positionals: tuple[tuple[str, bool], ...]  # (dest, takes all the rest)


@dataclasses.dataclass(frozen=True)
class AbslSpec:
    names: frozenset[str]
    booleans: frozenset[str]  # also as --noNAME
    prefixes: tuple[str, ...]  # --config.FIELD overrides


def _argparse_spec(parser: argparse.ArgumentParser) -> ArgparseSpec:
    options, positionals = {}, []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            for option in action.option_strings:
                options[option] = (action.nargs != 0, action.dest)
        else:
            positionals.append((action.dest, action.nargs in ("*", "+", argparse.REMAINDER)))
    return ArgparseSpec(options, tuple(positionals))


class _Parsing(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _parser_built_by(function: Callable[[], object]) -> argparse.ArgumentParser:
    """The parser a function builds and parses with (caught at its parse_args call)."""

    def caught(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsing(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", caught):
        try:
            function()
        except _Parsing as parsing:
            return parsing.parser
    raise AssertionError(f"{function} built no parser")


def _absl_spec(module: str, prefixes: tuple[str, ...] = ()) -> AbslSpec:
    from absl import flags

    by_module = flags.FLAGS.flags_by_module_dict()
    owners = [name for name in by_module if name == module or name.startswith("absl.")]
    defined = [f for name in owners for f in by_module[name]]
    names = {f.name for f in defined} | {f.short_name for f in defined if f.short_name}
    names |= {"help", "helpshort", "helpfull", "helpxml", "flagfile", "undefok", "?"}
    booleans = {f.name for f in defined if f.boolean}
    return AbslSpec(frozenset(names), frozenset(booleans), prefixes)


@functools.cache
def known_flags() -> dict[str, dict[str | None, ArgparseSpec | AbslSpec]]:
    """program -> subcommand (None: the program itself) -> the flags it defines, read from the
    parsers: `jaxtag`'s (jaxtag.cli.build_parser), the build and synth commands' argparse parsers,
    and the absl flags that jaxtag.cli.train / jaxtag.cli.evaluate define (with absl's own)."""
    import jaxtag.cli.evaluate  # noqa: F401  (defines its flags)
    import jaxtag.cli.train  # noqa: F401
    from data_prep import build, synth
    from jaxtag.cli import COMMANDS, build_parser

    top = build_parser()
    jaxtag_specs: dict[str | None, ArgparseSpec | AbslSpec] = {None: _argparse_spec(top)}
    for command in COMMANDS:
        parser = build_parser(command)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        jaxtag_specs[command] = _argparse_spec(sub.choices[command])
    return {
        "jaxtag": jaxtag_specs,
        "jaxtag-train": {None: _absl_spec("jaxtag.cli.train", ("config.",))},
        "jaxtag-eval": {None: _absl_spec("jaxtag.cli.evaluate")},
        "jaxtag-build": {None: _argparse_spec(_parser_built_by(lambda: build.parse_args([])))},
        "synth": {None: _argparse_spec(_parser_built_by(lambda: synth.main(["x.wav"])))},
    }


def _is_flag(word: str) -> bool:
    return bool(re.match(r"^--?[A-Za-z?]", word))


def subcommand(command: Command) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """For `jaxtag`: (subcommand, the words before it, the words after it)."""
    for i, word in enumerate(command.args):
        if not _is_flag(word):
            return word, command.args[:i], command.args[i + 1 :]
    return None, command.args, ()


def flag_problems(command: Command, known: dict) -> list[str]:
    """A line for each flag the command names that its program does not define (or for an
    unknown `jaxtag` subcommand); nothing for programs that are not jaxtag's."""
    specs = known.get(command.program)
    if specs is None:
        return []
    name = command.program
    checks = [(specs[None], command.args)]
    if command.program == "jaxtag":
        sub, before, after = subcommand(command)
        checks = [(specs[None], before)]
        if sub is not None and sub not in specs:
            if sub.isupper() or sub == "...":  # a placeholder: jaxtag COMMAND --help
                return []
            return [f"`jaxtag {sub}`: no such command"]
        if sub is not None:
            checks.append((specs[sub], after))
            name = f"jaxtag {sub}"
    problems = []
    for spec, words in checks:
        for word in words:
            if word == "--":
                break
            if _is_flag(word) and not _defines(spec, word):
                problems.append(f"`{name}` has no flag {word.split('=')[0]}")
    return problems


def _defines(spec: ArgparseSpec | AbslSpec, word: str) -> bool:
    option = word.split("=", 1)[0]
    if isinstance(spec, ArgparseSpec):
        return option in spec.options
    bare = option.lstrip("-")
    return (
        bare in spec.names
        or (bare.startswith("no") and bare[2:] in spec.booleans)
        or any(bare.startswith(prefix) for prefix in spec.prefixes)
    )


OUTPUT_DESTS = {"out", "out_dir", "csv", "jsonl", "taggram", "save_npz"}


def outputs(command: Command, known: dict) -> list[str]:
    """The files a `jaxtag` / synth / curl command writes (its --out, --csv, ..., OUT_DIR, the
    file of `curl -o`), as written in the command."""
    if command.program == "curl":
        args = command.args
        return [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-o", "--output")]
    specs = known.get(command.program)
    if specs is None or not all(isinstance(s, ArgparseSpec) for s in specs.values()):
        return []
    words = command.args
    spec = specs[None]
    if command.program == "jaxtag":
        sub, _, words = subcommand(command)
        if sub not in specs:
            return []
        spec = specs[sub]
    found, positionals, i = [], list(spec.positionals), 0
    while i < len(words):
        word = words[i]
        option, eq, value = word.partition("=")
        if _is_flag(word) and option in spec.options:
            takes_value, dest = spec.options[option]
            if takes_value and not eq:
                i += 1
                value = words[i] if i < len(words) else ""
            if takes_value and dest in OUTPUT_DESTS:
                found.append(value)
        elif not _is_flag(word) and positionals:
            dest, rest = positionals[0]
            if not rest:
                positionals.pop(0)
            if dest in OUTPUT_DESTS:
                found.append(word)
        i += 1
    return found


def not_in_a_test(command: Command) -> str | None:
    """Why a runnable block may not run this command (it needs a no-run mark), or None."""
    if command.program in NOT_IN_A_TEST:
        return f"`{command.program}` {NOT_IN_A_TEST[command.program]}"
    for word in command.args:
        url = re.match(r"^(?:\w+=@?)?(https?://)([^/:]+)", word)
        if url and url.group(2) not in ("127.0.0.1", "localhost"):
            return f"{url.group(1)}{url.group(2)}: the network"
    return None


def make_targets(makefile: Path = REPO / "Makefile") -> set[str]:
    """The targets the Makefile defines."""
    targets = set()
    for line in makefile.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_./$()-][^:=#]*?)\s*::?(?!=)", line)
        if match and not line.startswith("\t"):
            targets.update(t for t in match.group(1).split() if not t.startswith("."))
    return targets


def audio_names(code: str) -> list[str]:
    """The audio file names (wav, mp3, flac, ogg) a block mentions, in order, without repeats."""
    return list(dict.fromkeys(m.group(1) for m in AUDIO_NAME.finditer(code)))
