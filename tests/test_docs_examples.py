"""Every example of the documentation is executed (issue 19): the ```bash and ```python blocks of
README.md and docs/*.md, so that a renamed flag, a moved file or a changed output breaks CI.

A block that cannot run in a test (it needs MTAT/MSD, a GPU/TPU, several hosts, the network, pip,
or takes minutes like `make demo`) is preceded, on the line just before its opening fence, by
`<!-- no-run: REASON -->`. Every block is checked, marked or not (the fast tier):

* a shell block is ```bash (```text and a bare fence are outputs, never run); it passes `bash -n`,
  a python block `compile()`;
* every `jaxtag COMMAND --flag`, `jaxtag-train` / `run_train.py`, `jaxtag-eval` / `run_eval.py`,
  `jaxtag-build` / `python -m data_prep.build` and `python -m data_prep.synth` names only flags
  its parser defines (jaxtag.cli.build_parser, the absl flags of jaxtag.cli.train / evaluate with
  absl's own and --config.FIELD, the build and synth parsers); `make TARGET` a Makefile target;
* a runnable block calls nothing a test must not (pip, make, mpirun, srun, gcloud, sudo, git, a
  URL off this machine, ...: NOT_IN_A_TEST in tests/docs_examples_fixtures.py).

The runnable blocks of each page run in document order (later blocks use what earlier ones made)
in a fresh copy of one scratch folder made per session, as a reader's clone after `make demo`
looks: demo_workdir/run (a small checkpoint with the synthetic set's tags), ponswon.pth (a small
model in the released file's layout) and converted/ (it, converted; left out for a page whose
first use of it is its own `jaxtag convert ... converted/`), ~/Music, todo.txt, links to .venv,
configs/, data_prep/, jaxtag/, run_train.py, run_eval.py, and an empty docs/. Every audio file a
runnable block names (song.wav, a.mp3, ~/x.flac, ...) is generated if the folder lacks it
(tests/data_fixtures.write_audio; song.* 40 s). "ponswon" is fetched from the local stand-in of
the released weights (tests/released_fixtures.py). The environment: PATH with this Python's bin
first, PYTHONPATH the clone, HOME the copy's home/, the session's JAXTAG_CACHE_DIR.

A bash block runs as `bash -euo pipefail` (a failure names the page's line) and must not print
a traceback; each file its commands write (--out, --csv, --jsonl, --taggram, --save-npz, the OUT
of convert / export, curl -o) must exist after it; curl fails on an HTTP error status (it runs
with --fail-with-body). `jaxtag serve` (which never exits) starts the server in the background
and returns once /api/health answers, so the page's curl and httpx examples that follow run
against it; it replaces an earlier server of the page on the same port (as a reader stops one
before starting the next), waits while another run of this test serves on that port (a lock the
server holds), refuses a port another process holds, and is stopped (Ctrl-C) after the page's
last block; its log must hold no traceback. (tests/docs_examples_fixtures.py:
BASH_PRELUDE, serve_in_background.) Python blocks run in this process, one namespace per page,
in the same folder. docs/api.md's python blocks run in tests/test_docs_api.py, not here.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
import traceback
from pathlib import Path

import pytest

from tests.docs_examples_fixtures import (
    NOT_RUN,
    PYTHON,
    REPO,
    SHELLS,
    Block,
    Command,
    audio_names,
    fenced_blocks,
    flag_problems,
    known_flags,
    make_targets,
    not_in_a_test,
    outputs,
    shell_commands,
    subcommand,
)
from tests.docs_examples_scratch import SERVERS_ENV, prepare_scratch, provide_audio, stop_servers

DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md"))]
RUN_ELSEWHERE = {("docs/api.md", "python")}  # tests/test_docs_api.py executes them
BLOCK_TIMEOUT_S = 300


@functools.cache
def blocks_of(doc: str) -> tuple[tuple[Block, ...], tuple[str, ...]]:
    blocks, problems = fenced_blocks((REPO / doc).read_text(encoding="utf-8"), doc)
    return tuple(blocks), tuple(problems)


def runnable(doc: str) -> list[Block]:
    return [b for b in blocks_of(doc)[0] if b.runnable and (doc, b.lang) not in RUN_ELSEWHERE]


def block_problems(block: Block, known: dict, targets: set[str]) -> list[str]:
    """What is wrong with a block whether it runs or not (its language, syntax and flags),
    and for a runnable one what it may not call; one line each, naming the page's line."""
    if block.lang in NOT_RUN:
        return []
    if block.lang not in SHELLS | PYTHON:
        return [f"{block.where}: ```{block.lang}: a shell block is ```bash, an output ```text"]
    if block.lang in PYTHON:
        try:
            compile("\n" * block.line + block.code, block.doc, "exec")
        except SyntaxError as err:
            return [f"{block.doc}:{err.lineno}: {err.msg}"]
        return []
    syntax = subprocess.run(
        ["bash", "-n"], input="\n" * block.line + block.code, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    if syntax.returncode:  # "bash: line N: ...", N the page's line
        return [f"{block.where}: bash -n: {syntax.stderr.strip()}"]
    problems = []
    for command in shell_commands(block.code, block.first_line):
        found = flag_problems(command, known)
        if command.program == "make":
            found += [f"no make target {t}" for t in command.args
                      if not t.startswith("-") and "=" not in t and t not in targets]  # fmt: skip
        reason = not_in_a_test(command) if block.runnable else None
        if reason:
            found.append(f"{reason}: mark the block <!-- no-run: REASON --> or leave it out")
        serve = command.program == "jaxtag" and subcommand(command)[0] == "serve"
        if block.runnable and serve and command.word != "jaxtag":
            found.append(f"`{command.word} serve`: write `jaxtag serve` (run in the background)")
        problems += [f"{block.doc}:{command.line}: {line}" for line in found]
    return problems


# ----------------------------------------------------------------------------------------------
# The checks, on every block (fast)


def test_the_checks_catch_wrong_flags_and_commands():
    known, targets = known_flags(), make_targets()

    def problems(code: str, mark: str | None = None) -> list[str]:
        return block_problems(Block("page.md", 1, "bash", code, mark), known, targets)

    good = """\
jaxtag tag song.wav --checkpoint converted/ --top 5 --json  # a comment --nothing
jaxtag --version && jaxtag explain a.wav --checkpoint x --layer -1 --out f.png
python run_train.py --config configs/demo.py --workdir w --config.model.width=16 --nodistributed
mpirun -np 2 -x PATH python run_eval.py --checkpoint c --dataset d --verbosity=1
jaxtag-build synthetic_tags --data_dir d [--num_workers N] && python -m data_prep.synth x.wav -h
"""
    assert problems(good, "needs several hosts") == []
    assert problems("jaxtag tag a.wav --topk 3") == ["page.md:2: `jaxtag tag` has no flag --topk"]
    assert problems("jaxtag tagg a.wav") == ["page.md:2: `jaxtag tagg`: no such command"]
    assert problems("echo x\njaxtag-train --config demo \\\n  --work_dir w") == [
        "page.md:3: `jaxtag-train` has no flag --work_dir"
    ]
    assert problems("srun -N 2 python run_eval.py --checkpoint c --splits test", "x") == [
        "page.md:2: `jaxtag-eval` has no flag --splits"
    ]
    assert problems('gcloud ssh vm --command "python -m data_prep.build x --data-dir d"', "x") == [
        "page.md:2: `jaxtag-build` has no flag --data-dir"
    ]
    assert problems("make demo", "minutes") == [] and problems("make dmeo", "minutes") == [
        "page.md:2: no make target dmeo"
    ]
    assert "mark the block" in problems("pip install jaxtag")[0]
    assert "the network" in problems("curl -o x https://example.com/a")[0]
    assert problems("curl -F audio=@song.wav http://127.0.0.1:8000/api/tag") == []
    assert problems("if [ x; then") != []
    assert "write `jaxtag serve`" in problems(".venv/bin/jaxtag serve --checkpoint c")[0]
    python = Block("page.md", 1, "python", "print(1\n", None)
    assert block_problems(python, known, targets) == ["page.md:2: '(' was never closed"]
    shell = Block("page.md", 1, "sh", "ls\n", None)
    assert "```bash" in block_problems(shell, known, targets)[0]
    tag = Command("jaxtag", ("tag", "a.wav", "--csv", "t.csv", "--taggram=g.npz", "--top", "3"), 1)
    assert outputs(tag, known) == ["t.csv", "g.npz"]
    assert outputs(Command("jaxtag", ("convert", "x.pth", "out/", "--heads", "8"), 1), known) == [
        "out/"
    ]
    assert audio_names("tag song.wav ~/Music/b.flac -F audio=@c.mp3 http://h/d.ogg") == [
        "song.wav", "~/Music/b.flac", "c.mp3"
    ]  # fmt: skip


def test_the_parser_reads_the_api_page_as_tests_test_docs_api_does():
    from tests.test_docs_api import DOC, python_blocks

    ours = [b.code for b in blocks_of("docs/api.md")[0] if b.lang == "python"]
    assert ours == python_blocks(DOC.read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", DOCS)
def test_every_block_is_well_formed_and_names_real_flags(doc):
    blocks, problems = blocks_of(doc)
    known, targets = known_flags(), make_targets()
    problems = [*problems, *(p for b in blocks for p in block_problems(b, known, targets))]
    assert problems == []


# ----------------------------------------------------------------------------------------------
# Running them (slow)


@pytest.fixture(scope="session")
def docs_scratch(tmp_path_factory, released_pth):
    from jaxtag import released
    from tests.released_fixtures import FileServer

    server = FileServer(released_pth.data)
    try:
        released_env = {
            released.TEST_URL_ENV: server.url,
            released.TEST_BLOB_ID_ENV: released_pth.blob_id,
        }
        root = tmp_path_factory.mktemp("docs_examples")
        yield prepare_scratch(root, released_pth.path, released_env)
    finally:
        server.stop()


def copy_for(doc: str, scratch, blocks: list[Block], known: dict) -> Path:
    """The page's own copy of the scratch folder, with the audio its blocks name; a prepared
    output (converted/) the page itself writes first (without --overwrite) is left out."""
    folder = scratch.root / "pages" / doc.replace("/", "_").removesuffix(".md")
    shutil.copytree(scratch.template, folder, symlinks=True)
    seen: set[str] = set()
    written: set[str] = set()
    for block in blocks:
        if block.lang not in SHELLS:
            continue
        for command in shell_commands(block.code, block.first_line):
            for out in outputs(command, known):
                written.add(out)
                name = out.rstrip("/")
                if name not in seen and "--overwrite" not in command.args:
                    shutil.rmtree(folder / name, ignore_errors=True)
            seen.update(word.rstrip("/") for word in command.args)
    for block in blocks:
        for name in audio_names(block.code):
            if name not in written:
                provide_audio(scratch, folder, name)
    return folder


def run_bash(block: Block, folder: Path, scripts: Path, env: dict) -> str:
    script = scripts / f"{block.doc.replace('/', '_')}-{block.line}" / Path(block.doc).name
    script.parent.mkdir(parents=True)
    script.write_text("\n" * block.line + block.code)  # bash's line numbers are the page's
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", str(script)], cwd=folder, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=BLOCK_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{block.where}: the ```bash block ran past {BLOCK_TIMEOUT_S} s:\n{err.output}")
    if done.returncode:
        pytest.fail(f"{block.where}: the ```bash block exited {done.returncode}:\n{done.stdout}")
    assert "Traceback" not in done.stdout, f"{block.where}: a traceback:\n{done.stdout}"
    return done.stdout


def run_python(block: Block, namespace: dict) -> None:
    code = compile("\n" * block.line + block.code, str(REPO / block.doc), "exec")
    try:
        exec(code, namespace)  # noqa: S102
    except Exception:
        pytest.fail(f"{block.where}: the ```python block raised:\n{traceback.format_exc()}")


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if runnable(d)])
def test_every_example_of_the_page_runs(doc, docs_scratch, monkeypatch):
    known, blocks = known_flags(), runnable(doc)
    folder = copy_for(doc, docs_scratch, blocks, known)
    servers = docs_scratch.root / "servers" / folder.name
    extra = {**docs_scratch.env, "HOME": str(folder / "home"), SERVERS_ENV: str(servers)}
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(folder)
    env, namespace, took = dict(os.environ), {"__name__": "__main__"}, []
    try:
        for block in blocks:
            start = time.monotonic()
            if block.lang in SHELLS:
                output = run_bash(block, folder, docs_scratch.root / "scripts", env)
                missing = [f"{block.doc}:{command.line}: {out} was not written"
                           for command in shell_commands(block.code, block.first_line)
                           for out in outputs(command, known)
                           if not (folder / os.path.expanduser(out)).exists()]  # fmt: skip
                assert missing == [], f"{missing}\n{output}"
            else:
                run_python(block, namespace)
            took.append(f"{block.where} {time.monotonic() - start:.1f} s")
    finally:
        logs = stop_servers(servers) if servers.exists() else []
        print("\n".join(took))
    assert not [log for log in logs if "Traceback" in log], logs
