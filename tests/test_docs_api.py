"""Every Python example of docs/api.md runs, in order, as a reader would paste them: in a folder
holding `song.wav` and `other.wav`, with "ponswon" served by the local stand-in of the released
weights (tests/released_fixtures.py) instead of the internet."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tests.data_fixtures import write_audio

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_api_page_has_an_example_per_method():
    code = "\n".join(python_blocks(DOC.read_text(encoding="utf-8")))
    calls = ["jaxtag.load(", ".tag(", ".predict(", ".taggram(", ".embed(", ".explain(", ".plot(",
             ".export(", ".score(", ".predict_windows(", "convert_weights("]  # fmt: skip
    assert [c for c in calls if c not in code] == []


def test_every_python_example_of_the_api_page_runs(released_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_audio("song.wav", 9.0, 330.0, sr=44_100, channels=2)
    write_audio("other.wav", 40.0, 220.0, sr=22_050, seed=1)
    namespace: dict = {}
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "missing.wav: no such audio file" in out  # the Errors example
    assert Path("why.png").stat().st_size > 10_000 and Path("tagger.onnx").exists()
    assert namespace["both"].shape == (2, 50) and namespace["probs"].dtype == np.float32
    assert (Path("converted") / "meta").is_dir()
