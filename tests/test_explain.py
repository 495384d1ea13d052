"""Attention maps and tag-wise contributions against the PyTorch reference computed the slow way,
the explain figure, and `jaxtag tag` on real audio files of several formats and rates."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from jaxtag import audio, cli, explain, scoring, streaming
from jaxtag.checkpoint import load_model
from jaxtag.convert import convert_file
from tests import torch_reference as ref
from tests.conftest import log_mel_like, randomize_

pytestmark = pytest.mark.torch  # the PyTorch reference (tests/conftest.py TORCH_MODULES)

# Small enough that 65 one-position forward passes of the reference take a second.
SMALL = ref.ReferenceConfig(
    conv_channels=2,
    hidden_size=64,
    num_layers=2,
    num_heads=8,
    intermediate_size=128,
    attention_length=271,
    num_tags=50,
)
FRAMES = 64


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    torch.manual_seed(7)
    model = ref.wrap(ref.MTSA(SMALL))
    randomize_(model, 7)
    model.eval()
    torch.save(model.state_dict(), directory / "small.pth")
    checkpoint, _ = convert_file(directory / "small.pth", directory / "ckpt", num_heads=8)
    return model.module, checkpoint


def torch_contributions(model: ref.MTSA, mel: np.ndarray, layer: int) -> np.ndarray:
    """(S, tags): one forward pass per position t with layer `layer`'s attention one-hot on t."""
    attention = model.back_end.encoder.layer[layer].attention.self
    seq_len = mel.shape[-1] + 1
    outputs = []
    try:
        for t in range(seq_len):

            def forward(x, t=t):
                v = attention.split_heads(attention.value(x))
                probs = torch.zeros(x.shape[0], attention.num_heads, seq_len, seq_len)
                probs[..., t] = 1.0
                context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
                return context.view(x.shape[0], seq_len, -1), probs

            attention.forward = forward
            with torch.no_grad():
                probs, _ = model(torch.from_numpy(mel))
            outputs.append(probs[0].numpy())
    finally:
        del attention.forward  # back to the class's forward
    return np.stack(outputs)


@pytest.mark.parametrize("layer", [0, 1])
def test_maps_match_reference_slow_way(small_case, layer):
    model, checkpoint = small_case
    loaded = load_model(checkpoint)
    mel = log_mel_like(1, seed=3, frames=FRAMES)
    maps = explain.explain_chunk(loaded, mel[0], layer)

    with torch.no_grad():
        probs, attentions = model(torch.from_numpy(mel))
    first, last = attentions[0][0].numpy(), attentions[-1][0].numpy()
    np.testing.assert_allclose(maps["probs"], probs[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(maps["first_layer_received"], first.sum(1).mean(0)[1:], atol=1e-5)
    np.testing.assert_allclose(maps["last_layer_cls_heads"], last[:, 0, 1:], atol=1e-5)

    expected = torch_contributions(model, mel, layer)[1:]  # drop the CLS position
    assert maps["contributions"].shape == (FRAMES, 50)
    np.testing.assert_allclose(maps["contributions"], expected, atol=1e-5)
    # The maps carry information: outputs move with the attended position.
    assert expected.std(axis=0).max() > 1e-3


def _write(path, seconds, rate, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    y = 0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    sf.write(path, y.astype(np.float32), rate)


def test_explain_cli_writes_a_real_figure_and_maps(small_case, tmp_path, capsys):
    _, checkpoint = small_case
    wav = tmp_path / "song.wav"
    _write(wav, 6.0, 22_050)
    out, npz = tmp_path / "fig.png", tmp_path / "maps.npz"
    code = cli.main(
        [
            "explain",
            str(wav),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--tags",
            "guitar,loud",
            "--start",
            "1.0",
            "--save-npz",
            str(npz),
        ]
    )
    assert code == 0
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.shape[0] > 400 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # not blank
    maps = np.load(npz)
    assert maps["contributions"].shape == (256, 50)
    expected_start = audio.frames_to_seconds(audio.seconds_to_frames(1.0))
    assert float(maps["start_seconds"]) == pytest.approx(expected_start, abs=1e-6)

    assert (
        cli.main(
            [
                "explain",
                str(wav),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(out),
                "--tags",
                "not-a-tag",
            ]
        )
        == 2
    )
    assert "unknown tags" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "explain",
                str(wav),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(out),
                "--start",
                "60",
            ]
        )
        == 2
    )


def test_tag_files_of_several_formats_rates_and_lengths(small_case, tmp_path, capsys):
    _, checkpoint = small_case
    files = {
        "a.wav": (2.0, 16_000),
        "b.flac": (12.0, 44_100),
        "c.ogg": (5.0, 22_050),
        "d.mp3": (40.0, 44_100),  # longer than the protocol limit: adjacent windows
    }
    for name, (seconds, rate) in files.items():
        _write(tmp_path / name, seconds, rate, freq=220 * (1 + len(name)))
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"\x00not audio" * 50)
    paths = [str(tmp_path / n) for n in files] + [str(bad)]

    code = cli.main(
        [
            "tag",
            *paths,
            "--checkpoint",
            str(checkpoint),
            "--json",
            "--top",
            "3",
            "--batch-size",
            "8",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # one file failed
    assert "broken.mp3" in captured.err
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["file"] for r in records] == paths  # input order kept, failed file reported
    assert "error" in records[-1]

    # Whole-file predictions are the mean of the windows the module doc promises.
    scorer = scoring.WindowScorer(load_model(checkpoint), batch_size=8)
    for record, path in zip(records[:-1], paths[:-1], strict=True):
        mel = audio.load_log_mel(path)
        windows, _ = scoring.file_windows(mel, segments=False)
        expected = scorer.predict_windows(windows).mean(axis=0)
        top = record["tags"][0]
        assert top["score"] == pytest.approx(expected.max(), abs=1e-4)
        assert record["duration"] == pytest.approx(files[path.rsplit("/", 1)[1]][0], abs=0.05)
    long_mel = audio.load_log_mel(paths[3])
    assert len(scoring.file_windows(long_mel, False)[0]) == math.ceil(long_mel.shape[1] / 256)
    assert len(scoring.file_windows(audio.load_log_mel(paths[1]), False)[0]) == 16

    assert cli.main(["tag", paths[1], "--checkpoint", str(checkpoint), "--segments"]) == 0
    text = capsys.readouterr().out
    assert text.count(" s  ") == math.ceil(audio.load_log_mel(paths[1]).shape[1] / 256)


def _explain(checkpoint, wav, out, *extra):
    return cli.main(
        ["explain", str(wav), "--checkpoint", str(checkpoint), "--out", str(out), *extra]
    )


@pytest.mark.parametrize(
    "suffix, magic", [(".pdf", b"%PDF"), (".svg", b"<svg"), (".png", b"\x89PNG")]
)
def test_explain_writes_the_format_its_suffix_names(small_case, tmp_path, suffix, magic):
    _, checkpoint = small_case
    wav = tmp_path / "song.wav"
    _write(wav, 5.0, 16_000)
    out = tmp_path / f"fig{suffix}"
    assert _explain(checkpoint, wav, out) == 0
    head = out.read_bytes()[:400]
    assert magic in head
    assert set(tmp_path.iterdir()) == {wav, out}  # no temporary file left


def _write_noise(path, seconds, rate):
    """Noise under a slow envelope: nearly every mel bin above the 80 dB floor."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    y = 0.1 * rng.standard_normal(t.size) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t))
    sf.write(path, y.astype(np.float32), rate)


def _assert_same_above_floor(chunk, full):
    """The chunk is the whole file's log-mel, frame for frame, except at the dB floor (top_db
    below the decoded window's maximum, not the file's)."""
    floor = max(full.min(), chunk.min()) + 1.0
    above = (full > floor) & (chunk > floor)
    assert above.mean() > 0.9
    np.testing.assert_allclose(chunk[above], full[above], atol=1e-3)


def _one_line_error(capsys, *words):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert all(w in lines[0] for w in words), lines[0]


def test_explain_refuses_bad_start_and_outputs_before_drawing(small_case, tmp_path, capsys):
    _, checkpoint = small_case
    wav = tmp_path / "song.wav"
    _write(wav, 5.0, 16_000)
    for start in ("-5", "inf", "nan"):
        assert _explain(checkpoint, wav, tmp_path / "a.png", "--start", start) == 2
        _one_line_error(capsys, "start", start)

    assert _explain(checkpoint, wav, tmp_path / "fig.xyz") == 2
    _one_line_error(capsys, "fig.xyz", "format")

    blocker = tmp_path / "plain_file"
    blocker.write_text("not a folder")
    assert _explain(checkpoint, wav, blocker / "fig.png") == 2
    _one_line_error(capsys, "plain_file", "not a directory")

    # --save-npz's problem is found before the figure is drawn: no figure left behind.
    out = tmp_path / "fig.png"
    assert _explain(checkpoint, wav, out, "--save-npz", str(blocker / "maps.npz")) == 2
    _one_line_error(capsys, "plain_file")
    assert not out.exists()


def test_explain_save_npz_creates_its_folder(small_case, tmp_path):
    _, checkpoint = small_case
    wav = tmp_path / "song.wav"
    _write(wav, 5.0, 16_000)
    npz = tmp_path / "new" / "deeper" / "maps.npz"
    assert _explain(checkpoint, wav, tmp_path / "fig.png", "--save-npz", str(npz)) == 0
    assert np.load(npz)["contributions"].shape == (256, 50)


@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_explain_decodes_only_around_the_chunk(small_case, tmp_path, monkeypatch, rate):
    _, checkpoint = small_case
    wav = tmp_path / "long.wav"
    _write_noise(wav, 40.0, rate)
    decoded = []
    load_audio = audio.load_audio

    def recording_load_audio(*args, **kwargs):
        y = load_audio(*args, **kwargs)
        decoded.append(len(y))
        return y

    monkeypatch.setattr(audio, "load_audio", recording_load_audio)
    npz = tmp_path / "maps.npz"
    argv = ["--start", "20", "--save-npz", str(npz), "--chunk-only"]  # no whole-file tags
    assert _explain(checkpoint, wav, tmp_path / "fig.png", *argv) == 0
    assert "file_probs" not in np.load(npz).files
    chunk_seconds = audio.frames_to_seconds(audio.CHUNK_FRAMES)
    assert decoded and max(decoded) <= (chunk_seconds + 2 * streaming.MARGIN_SECONDS + 0.1) * 16_000

    full = audio.crop(audio.log_mel(load_audio(wav)), audio.seconds_to_frames(20.0))
    _assert_same_above_floor(np.load(npz)["mel"], full)


def test_explain_chunk_at_the_end_and_past_it(small_case, tmp_path, capsys):
    _, checkpoint = small_case
    wav = tmp_path / "song.wav"
    _write_noise(wav, 10.0, 22_050)
    mel = audio.load_log_mel(wav)
    last = mel.shape[-1] - audio.CHUNK_FRAMES
    chunk = streaming.chunk_log_mel(wav, last)
    assert chunk.shape == (96, 256)
    _assert_same_above_floor(chunk, mel[:, last:])
    assert _explain(checkpoint, wav, tmp_path / "f.png", "--start", "9") == 2
    _one_line_error(capsys, "past the last chunk start")
