"""The commands' own help is enough (issue 19): `jaxtag-train --help` and `jaxtag-eval --help`
list the command's own flags before any of absl's, each with its help, then examples and the
docs page; every `jaxtag` command's help ends with the page that documents it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtag import cli

REPO = Path(__file__).resolve().parents[1]
# The pages the help points to.
DOC_PAGES = (
    "docs/training.md",
    "docs/tagging.md",
    "docs/serving.md",
    "docs/api.md",
    "docs/datasets.md",
)
# command -> the page its help ends with (issue 19, item 5).
COMMAND_PAGES = {
    "convert": "docs/tagging.md",  # the released weights
    "info": "docs/tagging.md",
    "tag": "docs/tagging.md",
    "embed": "docs/tagging.md",
    "explain": "docs/tagging.md",
    "export": "docs/serving.md",
    "serve": "docs/serving.md",
}
# module -> (console script, run_*.py at the repository root)
ABSL_COMMANDS = {
    "jaxtag.cli.train": ("jaxtag-train", "run_train.py"),
    "jaxtag.cli.evaluate": ("jaxtag-eval", "run_eval.py"),
}
# Runs the module as `python -m` does and reports at exit which heavy modules were imported.
PROBE = """
import atexit, runpy, sys
heavy = ("jax", "jaxlib", "flax", "orbax", "tensorflow")
atexit.register(lambda: print("LOADED:" + ",".join(m for m in heavy if m in sys.modules),
                              file=sys.stderr))
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _page_is_known(page: str) -> bool:
    return page in DOC_PAGES  # and a file: test_the_pages_exist_and_document_their_commands


def _absl_flag_names() -> set[str]:
    from absl import app, flags

    app.define_help_flags()  # --help, --helpfull, ...: absl defines them in app.run
    by_module = flags.FLAGS.flags_by_module_dict()
    return {f.name for m, fs in by_module.items() if m.startswith("absl.") for f in fs}


def _first_mention(text: str, name: str) -> int | None:
    match = re.search(rf"(?<![\w-])--(?:\[no\])?{re.escape(name)}(?![\w.])", text)
    return match.start() if match else None


def _own(module_name: str):
    import importlib

    from jaxtag.cli.flag_help import module_flags

    module = importlib.import_module(module_name)
    return module, module_flags(module)


@pytest.fixture(scope="module", params=list(ABSL_COMMANDS))
def absl_help(request) -> tuple[str, subprocess.CompletedProcess]:
    """`python -m MODULE --help`, JAX and TensorFlow imports reported on stderr."""
    return request.param, _run([sys.executable, "-c", PROBE, request.param, "--help"])


def test_absl_help_exits_0_without_jax(absl_help):
    _, result = absl_help
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = [x for x in result.stderr.splitlines() if x.startswith("LOADED:")][-1]
    assert loaded == "LOADED:", loaded


def test_absl_help_lists_own_flags_with_their_help_before_any_absl_flag(absl_help):
    module_name, result = absl_help
    module, own = _own(module_name)
    out = result.stdout
    assert out.startswith(f"usage: {ABSL_COMMANDS[module_name][0]} ")
    assert {f.name for f in own} >= set(module.REQUIRED_FLAGS) and len(own) >= 5
    flags_at = out.index("\nflags:\n")  # after the usage line and the summary
    positions = {}
    for flag in own:
        positions[flag.name] = _first_mention(out[flags_at:], flag.name)
        assert positions[flag.name] is not None, flag.name
        text = re.sub(r"^<[^>]*>: ", "", flag.help)  # absl's "<a|b>: " before an enum's help
        assert _flat(text) in _flat(out), flag.name
    last_own = flags_at + max(positions.values())
    absl_mentions = [p for n in _absl_flag_names() if (p := _first_mention(out, n)) is not None]
    assert absl_mentions and min(absl_mentions) > last_own  # the --helpfull pointer, at the end
    # Required flags first, in the order the usage line gives them.
    required = [positions[name] for name in module.REQUIRED_FLAGS]
    assert required == sorted(required) and max(required) < min(
        p for n, p in positions.items() if n not in module.REQUIRED_FLAGS
    )


def test_train_help_explains_config_overrides():
    result = _run([sys.executable, "-m", "jaxtag.cli.train", "--help"])
    out = result.stdout[result.stdout.index("\nflags:\n") :]
    overrides = out.index("--config.FIELD=VALUE")
    assert _first_mention(out, "config") < overrides < _first_mention(out, "workdir")
    assert "--config.model.dtype=bfloat16" in _flat(out)


def test_absl_help_ends_with_examples_and_the_docs_page(absl_help):
    module_name, result = absl_help
    module, own = _own(module_name)
    lines = result.stdout.rstrip().splitlines()
    prog = ABSL_COMMANDS[module_name][0]
    assert module.HELP.examples and all(f"  {e}" in lines for e in module.HELP.examples)
    if prog == "jaxtag-train":  # the demo: the first thing a newcomer runs
        assert module.HELP.examples[0] == "jaxtag-train --config demo --workdir runs/demo"
    names = {f.name for f in own}
    for example in module.HELP.examples:
        words = shlex.split(example)
        assert words[0] == prog
        used = {w[2:].split("=")[0].split(".")[0] for w in words if w.startswith("--")}
        assert used <= names, example  # an example names only the command's own flags
    # The examples come after the flags; the help's last line is the docs page.
    assert lines.index(f"  {module.HELP.examples[0]}") > lines.index("flags:")
    assert lines[-1] == "documented in docs/training.md"
    assert _page_is_known("docs/training.md")


@pytest.mark.parametrize("module_name", ABSL_COMMANDS)
def test_absl_examples_parse(module_name):
    """Each example is a command line absl accepts (the config named by --config loads; the
    --config.FIELD overrides are read off sys.argv by ml_collections)."""
    module, _ = _own(module_name)
    for example in module.HELP.examples:
        code = (
            f"import shlex, sys; from {module_name} import parse_flags, FLAGS\n"
            f"sys.argv = shlex.split({example!r}); parse_flags(sys.argv)\n"
            "print('PARSED', *sorted(n for n in FLAGS if FLAGS[n].present))\n"
        )
        result = _run([sys.executable, "-c", code])
        assert result.returncode == 0, (example, result.stderr[-3000:])
        parsed = result.stdout.strip().splitlines()[-1].split()
        given = {w[2:].split("=")[0] for w in shlex.split(example) if w.startswith("--")}
        assert parsed[0] == "PARSED" and given <= set(parsed[1:]), (example, parsed)


@pytest.mark.parametrize("module_name", ABSL_COMMANDS)
def test_console_scripts_and_run_scripts_give_the_same_help(module_name):
    """`jaxtag-train --help`, `-h`, `python run_train.py --help`: one text, exit 0; before the
    change a console script listed no flag at all (its __main__ defines none)."""
    script, run_file = ABSL_COMMANDS[module_name]
    reference = _run([sys.executable, "-m", module_name, "--help"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    commands = [[sys.executable, run_file, "--help"], [sys.executable, "-m", module_name, "-h"]]
    installed = Path(sys.executable).parent / script
    if installed.exists():
        commands.append([str(installed), "--help"])
    for command in commands:
        result = _run(command)
        assert result.returncode == 0, (command, result.stderr[-3000:])
        assert result.stdout == reference.stdout, command


@pytest.mark.parametrize("module_name", ABSL_COMMANDS)
def test_helpfull_is_still_absls_full_listing(module_name):
    result = _run([sys.executable, "-m", module_name, "--helpfull"])
    _, own = _own(module_name)
    assert "absl.app:" in result.stdout and "--verbosity" in result.stdout
    assert all(_first_mention(result.stdout, f.name) is not None for f in own)
    assert "documented in docs/training.md" in result.stdout  # the preamble: the help's text


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_jaxtag_command_help_ends_with_its_docs_page(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    page = COMMAND_PAGES[command]
    assert cli.DOCS[command] == page
    assert out.rstrip().splitlines()[-1] == f"documented in {page}"
    assert _page_is_known(page)
    # An example, before the page, that the command's parser accepts.
    module = __import__(cli.COMMANDS[command][0], fromlist=["EXAMPLES"])
    assert module.EXAMPLES
    for example in module.EXAMPLES:
        assert f"\n  {example}\n" in out
        words = shlex.split(example)
        assert words[:2] == ["jaxtag", command]
        args = cli.build_parser(command).parse_args(words[1:])
        assert args.command == command


def test_jaxtag_help_points_to_the_readme_and_docs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    last = out.rstrip().splitlines()[-1]
    assert "README.md" in last and "docs/" in last
    assert "jaxtag-train" in out and "docs/training.md" in out and "docs/datasets.md" in out
    assert (REPO / "README.md").is_file() and (REPO / "docs").is_dir()


def test_build_help_ends_with_the_datasets_page():
    result = _run([sys.executable, "-m", "data_prep.build", "--help"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().splitlines()[-1] == "documented in docs/datasets.md"
    assert _page_is_known("docs/datasets.md")


def test_every_page_named_is_a_doc_page():
    named = {*COMMAND_PAGES.values(), *cli.DOCS.values(), "docs/training.md", "docs/datasets.md"}
    assert named <= set(DOC_PAGES)


def test_the_pages_exist_and_document_their_commands():
    commands = {
        **{f"jaxtag {c}": page for c, page in COMMAND_PAGES.items()},
        "jaxtag-train": "docs/training.md",
        "jaxtag-eval": "docs/training.md",
        "jaxtag-build": "docs/datasets.md",
    }
    for page in DOC_PAGES:
        assert (REPO / page).is_file(), page
    for command, page in commands.items():
        assert command in (REPO / page).read_text(encoding="utf-8"), (command, page)
