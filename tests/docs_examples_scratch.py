"""The scratch folder that tests/test_docs_examples.py runs the documentation's blocks in, and
`jaxtag serve` in the background for a page's bash blocks (the block parsing and the flag checks
are in tests/docs_examples_fixtures.py)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# The scratch folder

LINKED = (".venv", "configs", "data_prep", "jaxtag", "run_train.py", "run_eval.py")
"""What a clone's root holds that the examples name (linked, never written); docs/ is a real
empty folder there (an example writes docs/explain_demo.png)."""
BASH_PRELUDE = """\
# tests/test_docs_examples.py: `jaxtag serve` (which never exits) starts the server in the
# background and returns once /api/health answers; the test stops it after the page's last block.
# The failing line is named by the page's line number (the script is padded to it).
trap 'code=$?; echo >&2; echo "line $LINENO of the page exited $code" >&2' ERR
# curl fails on an HTTP error (a removed endpoint, a refused request), showing the answer.
curl() {
    command curl --fail-with-body --silent --show-error "$@" || return
}
jaxtag() {
    case " $* " in
        *" -h "* | *" --help "*) command jaxtag "$@" || return ;;
        " serve "*) python -m tests.docs_examples_scratch "$@" || return ;;
        *) command jaxtag "$@" || return ;;
    esac
}
"""
SERVERS_ENV = "JAXTAG_DOCS_SERVERS"  # the folder of the page's servers' pid files and logs
PORT_WAIT_S, START_WAIT_S, STOP_WAIT_S = 600, 180, 15


def serve_in_background(args: list[str]) -> int:
    """`jaxtag serve ARGS` for a page's bash block (BASH_PRELUDE): stops the page's earlier
    server on the same port (as a reader stops one before starting the next), takes the port's
    lock (another run of this test waits for its server to stop), starts `jaxtag serve ARGS` in
    its own session with its output in a log, waits for /api/health and prints the log so far.
    The server inherits the lock and holds it until it stops (stop_servers). Exit status 0, or 1
    with the reason: the port is held by a process this test did not start, the server exited,
    or it never answered."""
    import fcntl
    import socket
    import subprocess
    import tempfile
    import time
    import urllib.request

    host, port = "127.0.0.1", 8000
    for i, word in enumerate(args):
        name, eq, value = word.partition("=")
        value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        if name == "--host":
            host = value
        elif name == "--port":
            port = int(value)
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    servers = Path(os.environ[SERVERS_ENV])
    servers.mkdir(parents=True, exist_ok=True)
    pid_file = servers / f"port{port}.pid"
    if pid_file.exists():
        _stop(int(pid_file.read_text()))
    lock = open(Path(tempfile.gettempdir()) / f"jaxtag-docs-examples-port{port}.lock", "a")
    deadline = time.monotonic() + PORT_WAIT_S
    while port:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                print(f"port {port}: another run of this test held it {PORT_WAIT_S} s")
                return 1
            time.sleep(0.5)
    try:  # a server this test did not start must not answer for the one it starts
        socket.create_connection((host, port), timeout=2).close()
        print(f"jaxtag serve: {host}:{port} is already in use by another process")
        return 1
    except OSError:
        pass
    log_path = servers / f"port{port}.{time.time_ns()}.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            ["jaxtag", *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, pass_fds=(lock.fileno(),),
        )  # fmt: skip
    pid_file.write_text(str(server.pid))
    deadline, url = time.monotonic() + START_WAIT_S, ""
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if server.poll() is not None:
            print(f"jaxtag serve exited with {server.returncode}:\n{text}")
            return 1
        found = re.search(r"http://[^\s:/]+:(\d+)", text) if port == 0 else None
        url = f"http://{host}:{found.group(1) if found else port}/api/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    print(log_path.read_text(errors="replace"), end="")
                    return 0
        except OSError:
            pass
        time.sleep(0.25)
    print(f"jaxtag serve: no answer at {url} in {START_WAIT_S} s:\n{log_path.read_text()}")
    return 1


def _stop(pid: int) -> None:
    """Ctrl-C to a server's session, SIGKILL if it still runs STOP_WAIT_S later."""
    import signal
    import time

    try:
        os.killpg(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)


def stop_servers(servers: Path) -> list[str]:
    """Stops the servers a page's blocks started (serve_in_background); their logs."""
    for pid_file in sorted(servers.glob("port*.pid")):
        _stop(int(pid_file.read_text()))
    return [log.read_text(errors="replace") for log in sorted(servers.glob("port*.log"))]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie no one reaps has exited


@dataclasses.dataclass(frozen=True)
class Scratch:
    root: Path
    template: Path  # copied for each document
    prelude: Path  # BASH_PRELUDE, which bash reads first (BASH_ENV)
    weights: Path  # JAXTAG_WEIGHTS_DIR, shared: "ponswon" is fetched once a session
    audio: Path  # generated audio files by name, copied where an example names them
    env: dict[str, str]  # what the examples' environment adds to the test's


def prepare_scratch(root: Path, released_pth: Path, released_env: dict[str, str]) -> Scratch:
    """The folder the examples start from, as a reader's clone after `make demo` looks:
    demo_workdir/run (a small checkpoint with the synthetic set's tags), ponswon.pth (a small
    model in the released file's layout, the one "ponswon" downloads from the local stand-in),
    converted/ (that file converted), ~/Music (three short files), todo.txt (a --files-from
    list), links to the clone's .venv, configs, data_prep, jaxtag and scripts, an empty docs/."""
    from data_prep.synth import TAG_NAMES
    from jaxtag.convert import convert_file
    from tests.data_fixtures import write_audio
    from tests.tag_fixtures import make_checkpoint

    template = root / "template"
    for folder in (template / "docs", root / "weights", root / "audio"):
        folder.mkdir(parents=True)
    for name in LINKED:
        target = Path(sys.prefix) if name == ".venv" else REPO / name
        (template / name).symlink_to(target)
    make_checkpoint(template / "demo_workdir" / "run", tags=list(TAG_NAMES))
    shutil.copyfile(released_pth, template / "ponswon.pth")
    convert_file(template / "ponswon.pth", template / "converted")
    music = template / "home" / "Music"
    write_audio(str(music / "one.wav"), 8.0, 330.0, sr=22_050)
    write_audio(str(music / "album" / "two.flac"), 8.0, 220.0, sr=44_100, channels=2, seed=1)
    write_audio(str(music / "album" / "three.ogg"), 8.0, 440.0, sr=16_000, seed=2)
    (template / "todo.txt").write_text("home/Music/one.wav\nhome/Music/album/two.flac\n")
    (root / "prelude.sh").write_text(BASH_PRELUDE)
    import matplotlib

    env = dict(released_env)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        JAXTAG_WEIGHTS_DIR=str(root / "weights"),
        MPLCONFIGDIR=matplotlib.get_configdir(),  # a fresh HOME would rebuild the font cache
        BASH_ENV=str(root / "prelude.sh"),
    )
    return Scratch(root, template, root / "prelude.sh", root / "weights", root / "audio", env)


def provide_audio(scratch: Scratch, folder: Path, name: str) -> None:
    """Writes the audio file `name` (relative to `folder`, or ~/ for HOME = folder/home) unless
    it exists: a stereo 44.1 kHz 40 s tone for song.* (long enough for `--start 30`), a 12 s mono
    one otherwise; each name generated once a session."""
    from tests.data_fixtures import write_audio

    path = folder / "home" / name[2:] if name.startswith("~/") else folder / name
    if path.exists():
        return
    cached = scratch.audio / Path(name).name
    if not cached.exists():
        if cached.stem.startswith("song"):
            write_audio(str(cached), 40.0, 330.0, sr=44_100, channels=2)
        else:
            seed = sum(map(ord, cached.name))
            write_audio(str(cached), 12.0, 220.0 + seed % 200, sr=22_050, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, path)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:  # BASH_PRELUDE's `jaxtag serve`
    sys.exit(serve_in_background(sys.argv[1:]))
