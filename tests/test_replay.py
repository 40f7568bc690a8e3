"""``replay.py render`` and ``report``: decoded frame counts and self-contained HTML."""
from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from fgmf_marl.oversight import load_episode
from fgmf_marl.oversight.render import render_frames
from fgmf_marl.jobs.replay import main as replay_main
from test_oversight import sign_noise, write_log


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("oversight")
    write_log(folder, n_episodes=2, every=1, perturb=sign_noise(), attack="sign-noise")
    return folder


def test_render_video_frame_count_equals_logged_steps(log_dir: Path, tmp_path: Path, capsys) -> None:
    assert replay_main(["render", f"{log_dir}:1", "-o", str(tmp_path / "ep1"), "--fps", "5"]) == 0
    ep = load_episode(log_dir / "ep_000001")
    n = len(ep.arrays["logged_t"])
    mp4, gif = tmp_path / "ep1.mp4", tmp_path / "ep1.gif"
    assert capsys.readouterr().out.split() == [str(mp4), str(gif)]
    frames = iio.imread(mp4, plugin="pyav") if _has_pyav() else np.stack(list(_ffmpeg_frames(mp4)))
    assert len(frames) == n == 5
    assert len(iio.imread(gif, index=None)) == n
    first = render_frames(ep)[0]
    assert frames[0].shape == first.shape
    assert not list(tmp_path.glob(".*"))  # no leftover partial files


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
        return True
    except ImportError:
        return False


def _ffmpeg_frames(path: Path):
    import imageio.v2 as imageio
    with imageio.get_reader(path, format="FFMPEG") as reader:
        yield from reader


def test_render_rejects_missing_episode(log_dir: Path) -> None:
    from fgmf_marl.jobs.cli import run as run_cli
    from fgmf_marl.config import ConfigError
    with pytest.raises(ConfigError, match="not found"):
        replay_main(["render", f"{log_dir}:7"])
    assert run_cli(replay_main, ["render", f"{log_dir}:7"], prog="replay.py") == 2
    assert run_cli(replay_main, ["render", str(log_dir / "ep_000000"), "--format", "avi"], prog="replay.py") == 2


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "data", "poster") and v is not None:
                self.refs.append((tag, k, v))


@pytest.mark.parametrize("which", ["episode", "dir"])
def test_report_is_valid_self_contained_html(log_dir: Path, tmp_path: Path, which: str) -> None:
    out = tmp_path / "r.html"
    target = str(log_dir / "ep_000000") if which == "episode" else str(log_dir)
    assert replay_main(["report", target, "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    parser = _Refs()
    parser.feed(text)
    parser.close()
    assert "link" not in parser.tags and "script" not in parser.tags
    assert parser.refs, "the report should embed images"
    for tag, attr, value in parser.refs:
        assert value.startswith("data:") or value.startswith("#"), (tag, attr, value[:60])
    assert sum(v.startswith("data:image/gif") for _, _, v in parser.refs) >= 1
    assert "Look at these steps first" in text and "flipped" in text.lower() or "low agreement" in text
    if which == "dir":
        assert "chain intact" in text
