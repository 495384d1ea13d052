"""The explain figure says what it shows (jaxtag/explain_figure.py), read back from matplotlib's
objects: colour bars and their labels, the head panel's ticks on the cell centres, each tag row's
raw output range, the title's file and chunk tags wrapped to the figure, a caption per panel, one
x extent (the chunk's seconds) for every panel; the file's probabilities in the Explanation and
its .npz; and the README figure's documented command (`make readme-figure`) on a tiny model."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import jaxtag
from data_prep import synth
from jaxtag import audio, cli, explain, explain_figure
from tests.tag_fixtures import make_checkpoint, write_library

REPO = Path(__file__).resolve().parents[1]
TAGS = list(synth.TAG_NAMES)  # the demo model's tags, so the Makefile's --tags apply


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("figure_ckpt") / "ckpt", tags=TAGS)


@pytest.fixture(scope="module")
def tagger(checkpoint) -> jaxtag.Tagger:
    return jaxtag.load(checkpoint, engine="jax")


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> str:
    return write_library(tmp_path_factory.mktemp("figure_audio"), [12.0])[0]


@pytest.fixture(scope="module")
def explanation(tagger, song) -> explain.Explanation:
    return tagger.explain(song, start=3.0, tags=["plucked", "drums", "fast"])


@pytest.fixture
def figure(explanation):
    import matplotlib.pyplot as plt

    fig = explanation.figure()
    fig.canvas.draw()  # the constrained layout placed
    yield fig
    plt.close(fig)


def main_axes(fig) -> list:
    """The five panels, top to bottom (the axes sharing the time axis)."""
    first = fig.axes[0]
    panels = [a for a in fig.axes if first.get_shared_x_axes().joined(first, a)]
    assert len(panels) == 5
    return panels


def colorbars(fig) -> list:
    return [a._colorbar for a in fig.axes if hasattr(a, "_colorbar") and a.get_visible()]


def test_heat_maps_have_labelled_colour_bars_and_line_panels_units(figure):
    mel, first, heads, mean, tags = main_axes(figure)
    bars = colorbars(figure)
    assert len(bars) == 3
    by_panel = {id(image.axes): image.colorbar for a in (mel, heads, tags) for image in a.images}
    assert set(map(id, bars)) == set(map(id, by_panel.values()))
    assert "dB" in by_panel[id(mel)].ax.get_ylabel()
    assert by_panel[id(heads)].ax.get_ylabel() == "attention weight"
    label = by_panel[id(tags)].ax.get_ylabel()
    assert "scaled per tag" in label and "0 = its min" in label and "1 = its max" in label
    assert "uniform" in first.get_ylabel() and "×" in first.get_ylabel()
    assert "attention" in mean.get_ylabel()
    dashed = [line for line in first.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and set(np.asarray(dashed[0].get_ydata(), float)) == {1.0}
    uniform = [line for line in mean.get_lines() if line.get_linestyle() == "--"]
    assert set(np.asarray(uniform[0].get_ydata(), float)) == {1 / (audio.CHUNK_FRAMES + 1)}


def test_head_ticks_sit_on_the_cell_centres(figure, explanation):
    heads_ax = main_axes(figure)[2]
    n = explanation.maps["last_layer_cls_heads"].shape[0]
    np.testing.assert_allclose(heads_ax.get_yticks(), np.arange(n) + 0.5)
    assert [t.get_text() for t in heads_ax.get_yticklabels()] == [f"head {h + 1}" for h in range(n)]
    image = heads_ax.images[0]
    assert image.get_extent()[2:] == [n, 0]  # row h spans h..h+1: its tick is its centre


def test_tag_rows_give_their_tag_and_raw_output_range(figure, explanation):
    tags_ax = main_axes(figure)[4]
    labels = [t.get_text() for t in tags_ax.get_yticklabels()]
    raw = explanation.contributions  # (frames, chosen)
    assert len(labels) == len(explanation.chosen) == raw.shape[1]
    for i, (tag, label) in enumerate(zip(explanation.chosen, labels, strict=True)):
        assert label == f"{tag} {raw[:, i].min():.2f}–{raw[:, i].max():.2f}"
    np.testing.assert_allclose(tags_ax.get_yticks(), np.arange(len(labels)) + 0.5)
    scaled = tags_ax.images[0].get_array()
    np.testing.assert_allclose(scaled.min(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(scaled.max(axis=1), 1.0, atol=1e-6)


def test_every_panel_has_a_one_line_caption_and_the_same_time_axis(figure, explanation):
    panels = main_axes(figure)
    span = (explanation.start, explanation.start + audio.frames_to_seconds(audio.CHUNK_FRAMES))
    for ax in panels:
        caption = ax.get_title(loc="left")
        assert len(caption) > 20 and "\n" not in caption
        np.testing.assert_allclose(ax.get_xlim(), span)
    assert len({ax.get_title(loc="left") for ax in panels}) == 5
    assert "(s)" in panels[-1].get_xlabel()
    # The colour bars take the same width beside every panel: the x axes line up.
    lefts = {round(ax.get_position().x0, 4) for ax in panels}
    rights = {round(ax.get_position().x1, 4) for ax in panels}
    assert len(lefts) == 1 and len(rights) == 1


def _top(probs, k=5):
    return [TAGS[i] for i in np.argsort(-probs, kind="stable")[:k]]


def test_the_title_names_the_file_the_chunk_and_both_top_tags(figure, explanation, song):
    text = figure.get_suptitle()
    first, end = explanation.start, explanation.start + audio.frames_to_seconds(256)
    assert Path(song).name in text and f"chunk {first:.1f}–{end:.1f} s" in text
    whole, chunk = text.split("top tags of this chunk:")
    for tag in _top(explanation.file_probs):
        assert f"{tag} {explanation.file_probs[TAGS.index(tag)]:.2f}" in whole
    for tag in _top(explanation.maps["probs"]):
        assert f"{tag} {explanation.maps['probs'][TAGS.index(tag)]:.2f}" in chunk
    assert "whole file" in whole


def test_long_tag_names_wrap_inside_the_figure(explanation):
    import matplotlib.pyplot as plt

    longer = {t: f"{t}_with_a_really_long_descriptive_name_{i}" for i, t in enumerate(TAGS)}
    long = dataclasses.replace(
        explanation, tags=[longer[t] for t in TAGS], chosen=[longer[t] for t in explanation.chosen]
    )
    fig = long.figure()
    try:
        fig.canvas.draw()
        lines = fig.get_suptitle().splitlines()
        assert len(lines) > 3 and max(map(len, lines)) <= explain_figure.title_width()
        flat = " ".join(lines)  # wrapped between words: every top tag still named, whole
        for tag in _top(long.file_probs) + _top(long.maps["probs"]):
            assert longer[tag] in flat
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        texts = [t for t in fig.texts if t.get_text()]
        for ax in main_axes(fig):
            texts += [ax.title, ax._left_title, *ax.get_yticklabels(), ax.yaxis.label]
        for t in texts:
            extent = t.get_window_extent(renderer)
            assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, t.get_text()
        # The tag rows' labels wrap the name whole and still end with the raw range.
        for label, tag in zip(main_axes(fig)[4].get_yticklabels(), long.chosen, strict=True):
            assert "".join(label.get_text().split()[:-1]) == tag
    finally:
        plt.close(fig)


def test_file_probs_are_the_whole_files_and_saved(tagger, explanation, song, tmp_path):
    np.testing.assert_allclose(explanation.file_probs, tagger.predict(song), atol=1e-6)
    decoded = audio.load_audio(song)
    from_wave = tagger.explain(decoded, start=3.0, sr=audio.SAMPLE_RATE)
    np.testing.assert_allclose(from_wave.file_probs, tagger.predict(decoded, sr=16_000), atol=1e-6)
    npz = explanation.save_npz(tmp_path / "maps.npz")
    with np.load(npz) as saved:
        np.testing.assert_allclose(saved["file_probs"], explanation.file_probs)

    chunk_only = tagger.explain(song, start=3.0, file_tags=False)
    assert chunk_only.file_probs is None
    assert "whole file" not in chunk_only.title() and "this chunk" in chunk_only.title()
    old = chunk_only.save_npz(tmp_path / "old.npz")  # as earlier versions wrote them
    with np.load(old) as saved:
        assert "file_probs" not in saved.files
    assert explain.is_explain_npz(str(old)) and explain.is_explain_npz(str(npz))


def readme_figure_commands() -> list[list[str]]:
    """The recipe of the Makefile's `readme-figure` target, one argv per command."""
    text = (REPO / "Makefile").read_text(encoding="utf-8").replace("\\\n", " ")
    recipe = re.search(r"^readme-figure:.*\n((?:\t.*\n)+)", text, flags=re.M)
    assert recipe, "the Makefile has no readme-figure target"
    return [shlex.split(line) for line in recipe.group(1).splitlines()]


def test_the_readme_figure_command_draws_the_figure(checkpoint, tmp_path, capsys):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "make readme-figure" in readme and "docs/explain_demo.png" in readme
    commands = readme_figure_commands()
    assert [c[:3] for c in commands] == [
        ["$(PY)", "-m", "data_prep.synth"],
        ["$(VENV)/bin/jaxtag", "explain", "$(DEMO_DIR)/example.wav"],
    ]
    out = tmp_path / "explain_demo.png"
    swaps = {
        "$(DEMO_DIR)/run": str(checkpoint),
        "docs/explain_demo.png": str(out),
    }
    for command in commands:
        argv = [swaps.get(a, a.replace("$(DEMO_DIR)", str(tmp_path))) for a in command[1:]]
        if command[0] == "$(PY)":
            assert synth.main(argv[2:]) == 0
        else:
            assert cli.main(argv) == 0
    assert f"figure written to {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 50_000
