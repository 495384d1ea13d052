"""Peak memory of `jaxtag tag` on long files: does it grow with the file's length?

    python bench/bench_long_audio.py                     # 1-hour and 3-hour files
    python bench/bench_long_audio.py --hours 0.5 1 --no-baseline

Writes a 16 kHz mono PCM-16 wav of each length (a tone under a slow envelope, 115 MB an hour),
then runs `jaxtag tag FILE --checkpoint CKPT --engine jax` on it in a fresh process and reads
that process's peak RSS (`os.wait4`). The baseline runs the same with the mel held in memory
(`jaxtag.streaming.SPILL_SECONDS` set past the file's length), as before files over 10 minutes
were read window by window. The model is a small random one: the model's own memory does not
depend on the audio. Prints one row per length and engine path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RUN = """
import sys
from jaxtag import streaming
from jaxtag.cli import main
if sys.argv[1] == "memory":
    streaming.SPILL_SECONDS = float("inf")
sys.exit(main(["tag", *sys.argv[2:]]))
"""


def write_wav(path: Path, hours: float) -> None:
    """A PCM-16 wav written a minute at a time (never the whole signal in memory)."""
    import soundfile as sf

    sr, minute = 16_000, 60 * 16_000
    with sf.SoundFile(path, "w", sr, 1, "PCM_16") as f:
        for m in range(int(round(hours * 60))):
            t = (np.arange(minute) + m * minute) / sr
            envelope = 0.5 + 0.4 * np.sin(2 * np.pi * t / 37.0)
            f.write((0.3 * envelope * np.sin(2 * np.pi * 220 * t)).astype(np.float32))


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a child process running argv."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAXTAG_CACHE_DIR": "off"}
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[3:]} failed with {status}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-memory runs")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from tests.tag_fixtures import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp) / "ckpt")
        rows = []
        for hours in args.hours:
            wav = Path(tmp) / f"{hours:g}h.wav"
            write_wav(wav, hours)
            tag = [str(wav), "--checkpoint", str(checkpoint), "--engine", "jax", "--json"]
            modes = ["spilled"] + ([] if args.no_baseline else ["memory"])
            for mode in modes:
                rss, seconds = peak_rss_mb([sys.executable, "-c", RUN, mode, *tag])
                rows.append((hours, mode, rss, seconds))
                print(
                    f"{hours:g} h  {mode:<8} peak RSS {rss:7.0f} MB  {seconds:6.1f} s", flush=True
                )
            wav.unlink()
    print("\nhours  mel      peak RSS (MB)   vs the first length")
    for mode in ("spilled", "memory"):
        mine = [r for r in rows if r[1] == mode]
        for hours, _, rss, _ in mine:
            print(f"{hours:5g}  {mode:<8} {rss:13.0f}   {rss / mine[0][2]:.3f}x")
    print(f"CPU: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
