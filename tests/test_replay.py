"""``replay.py render`` and ``report``: decoded frame counts and self-contained HTML."""
from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from fgmf_marl.jobs.replay import main as replay_main
from fgmf_marl.oversight import load_episode
from fgmf_marl.oversight.render import render_frames
from fgmf_marl.oversight.report import build_report
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
    assert sum(v.startswith("data:image/webp") for _, _, v in parser.refs) == (1 if which == "episode" else 2)  # replays
    assert "Look at these steps first" in text and "Ranked: flipped actions first" in text
    if which == "dir":
        assert "chain intact" in text


# ------------------------------------------------------------------ derived files stay out of the log (item 1)
def test_render_and_report_write_outside_the_chained_files(tmp_path: Path, capsys) -> None:
    """Default outputs go to <log>/replay/, which verify names as derived; -o directly inside a log is refused."""
    import shutil
    from fgmf_marl.jobs.cli import run as run_cli
    from fgmf_marl.oversight import verify
    log = tmp_path / "log"
    shutil.copytree(_small_log(tmp_path), log)
    assert replay_main(["render", f"{log}:0", "--format", "gif"]) == 0
    assert replay_main(["report", str(log)]) == 0
    assert replay_main(["report", f"{log}:1"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(log / "replay" / n) for n in ("ep_000000.gif", "report.html", "ep_000001.html")]
    res = verify(log)
    assert res.ok and "replay/ holds derived files" in res.message
    assert replay_main(["verify", str(log)]) == 0
    before = sorted(log.iterdir())
    for argv in (["render", f"{log}:0", "-o", str(log / "ep_000000")], ["report", str(log), "-o", str(log / "r.html")]):
        assert run_cli(replay_main, argv, prog="replay.py") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "inside the oversight log" in err
    assert sorted(log.iterdir()) == before and verify(log).ok


@pytest.fixture(scope="module")
def small_log(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small") / "log"
    write_log(folder, n_episodes=2, every=2, perturb=sign_noise(), attack="sign-noise")
    return folder


def _small_log(tmp_path: Path) -> Path:
    folder = tmp_path / "small"
    write_log(folder, n_episodes=2, every=2, perturb=sign_noise(), attack="sign-noise")
    return folder


# ------------------------------------------------------------------ a folder of per-cell logs (item 2)
def test_verify_and_report_agree_on_a_folder_of_cell_logs(small_log: Path, tmp_path: Path, capsys) -> None:
    import shutil
    from fgmf_marl.jobs.cli import run as run_cli
    root = tmp_path / "explanations"
    cells = ["ckpt__none__eps0__s0", "ckpt__pgd__eps8__s0"]
    for cell in cells:
        shutil.copytree(small_log, root / cell)
    (root / "notes").mkdir()                                  # not a log: ignored by both
    assert replay_main(["verify", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in out[:2]] == [str(root / c) for c in cells]
    assert all("OK: 2 episodes" in line for line in out[:2]) and out[2] == "2 of 2 logs OK"
    assert replay_main(["report", str(root)]) == 0
    page = (root / "report.html").read_text()
    assert capsys.readouterr().out.strip() == str(root / "report.html")
    for i, cell in enumerate(cells):
        assert f"<a href='#c{i}'>{cell}</a>" in page and f"id='c{i}-ep_000001'" in page
    assert page.count("chain intact") == 4                    # each log's verdict, in the table and its section
    js = root / cells[1] / "ep_000001.json"                   # one cell tampered: verify fails, the page says so
    js.write_text(js.read_text().replace('"attack": "sign-noise"', '"attack": "none"'))
    assert replay_main(["verify", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith(f"{root / cells[1]}: FAILED: entry 1") and out[2] == "1 of 2 logs OK, 1 FAILED"
    assert "FAILED: entry 1 (ep_000001)" in build_report(root, tmp_path / "r.html").read_text()
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    for cmd in ("verify", "report"):                          # neither a log nor a folder of logs: the same refusal
        assert run_cli(replay_main, [cmd, str(empty)], prog="replay.py") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is not an oversight log" in err and "no sub-folder" in err
    assert sorted(p.name for p in empty.rglob("*")) == ["sub"]  # no half-written page
    with pytest.raises(Exception, match="names one log's head"):
        replay_main(["verify", str(root), "--expect-head", "0" * 64])


# ------------------------------------------------------------------ frames: headers, captions, legend, outline (item 3)
def test_frame_headers_captions_colour_bars_and_relevance_outline(small_log: Path) -> None:
    from fgmf_marl.oversight import render
    ep = load_episode(small_log / "ep_000000")
    a = ep.arrays
    assert render.FONT_PX >= 12 and render.font().getbbox("Ag")[3] >= 12
    a["flipped"] = a["flipped"].copy()
    a["flipped"][a["logged_t"][0], 0] = True
    text = render.caption(ep, 0, 0)
    assert " | FLIPPED | agreement " in text and "FLIPPEDagree" not in text
    assert render.columns(ep) == ["observation seen", "PGCA map"]
    plain = render.compose_frame(ep, 0, 3)
    assert not (plain == render.OUTLINE).all(-1).any()        # no relevance logged: no outline
    assert (plain == render.heat_rgb(np.ones(1))[0]).all(-1).any()  # the colour bar's top end is drawn
    size = a["pgca_final"].shape[-1]
    rel = np.zeros(a["pgca_final"].shape, bool)
    rel[..., 4:10, 4:10] = True
    a["relevance"] = rel
    a["sgam_mask"] = np.full(a["pgca_final"].shape, 0.5, np.float16)
    assert render.columns(ep)[-1] == "SGAM keep-mask"
    row = render.agent_row(ep, 0, 1, 3)
    cyan = (row == render.OUTLINE).all(-1)
    tile = size * 3
    strip = cyan[-tile:]                                      # the tiles under the caption
    seen_part, pgca_part, sgam_part = (strip[:, 11 + i * (tile + 4): 11 + i * (tile + 4) + tile] for i in range(3))
    assert not seen_part.any() and pgca_part.sum() == sgam_part.sum() == 4 * (6 * 3 - 1)  # a 1 px square outline
    assert render.legend(ep, 300).shape[0] > render.legend(load_episode(small_log / "ep_000000"), 300).shape[0]


def test_legend_colours_match_the_native_env() -> None:
    """The legend's copy of the env's colours (this layer may not import envs) stays equal to the env's."""
    from fgmf_marl.envs import native
    from fgmf_marl.oversight import render
    assert [tuple(c) for c in native.RENDER_AGENTS.tolist()] == list(render.AGENT_COLOURS)
    assert len(render.AGENT_COLOUR_NAMES) == len(render.AGENT_COLOURS)
    own = [c for _, c in render.OWN_VIEW_LEGEND]
    assert own == [tuple(native.OWN), tuple(native.TEAMMATE), tuple(native.LANDMARK),
                   *(tuple(d) for d in native.DISTRACTORS)]


# ------------------------------------------------------------------ ranking and cards (item 4)
def _attacked(ep):
    """The episode as under PGD: every action flipped; evidence and (flat) values made up to test the ranking."""
    a = ep.arrays
    L, N = a["evidence"].shape
    a["flipped"] = np.ones_like(a["flipped"])
    evidence = np.linspace(1.9, 0.5, L * N).reshape(L, N)           # the lowest at the last step
    evidence[1, :] = 0.1                                        # except step index 1: the lowest, for every agent
    a["evidence"] = evidence.astype(np.float32)
    a["values"] = np.zeros_like(a["values"])
    return ep


def test_review_steps_rank_when_every_step_flips(small_log: Path) -> None:
    from fgmf_marl.oversight.report import review_steps
    ep = _attacked(load_episode(small_log / "ep_000000"))
    steps = review_steps(ep, limit=3)
    assert [j for j, _, _ in steps] == [1, 2, 0]               # lowest evidence first, one card per step, not t order
    assert steps[0] == (1, 0, "flipped action, evidence +0.10, value drop +0.000")
    assert all(why.startswith("flipped action, evidence") for _, _, why in steps)
    t1 = int(ep.arrays["logged_t"][1])
    ep.arrays["values"][t1 - 1, :] = 1.0
    ep.arrays["values"][t1, 1] = -1.0                          # the agents tie on evidence: agent 1 lost more value
    assert review_steps(ep, limit=1) == [(1, 1, "flipped action, evidence +0.10, value drop +2.000")]
    ep.arrays["flipped"][:] = False                            # nothing flipped: lowest evidence first
    assert review_steps(ep, limit=1)[0][2].startswith("not flipped, evidence +0.10")
    del ep.arrays["evidence"]                                  # a log from before evidence existed: agreement ranks
    assert review_steps(ep, limit=1)[0][2].startswith("not flipped, agreement")


def test_cards_show_and_frame_their_agent(small_log: Path, tmp_path: Path) -> None:
    from fgmf_marl.oversight import render
    from fgmf_marl.oversight.report import RANKING, episode_section
    ep = _attacked(load_episode(small_log / "ep_000001"))
    card = render.compose_frame(ep, 1, 3, agents=[1], focus=1, with_legend=False)
    full = render.compose_frame(ep, 1, 3)
    assert (card == render.FOCUS).all(-1).sum() > 4 * 3 * 100   # a 3 px frame round the agent's row
    assert not (full == render.FOCUS).all(-1).any() and card.shape[0] < full.shape[0]
    page = episode_section(ep)
    assert RANKING in page and "<b>#1 agent 0: flipped action, evidence +0.10" in page
    assert "alt='agent 0 at step" in page


# ------------------------------------------------------------------ size (item 5)
def test_report_is_at_most_1_mb_per_episode_on_a_native_env_log(tmp_path: Path) -> None:
    """The native env's defaults (48x48 images, 3 agents, 40 steps), every step logged, under sign noise
    (noisy observations compress worst): measured 0.74 MB per episode (the GIF-based page was 3.6 MB)."""
    from fgmf_marl.envs.batched import CoverageVecEnv
    from fgmf_marl.envs.native import CoverageConfig
    from fgmf_marl.attribution import PGCA
    from fgmf_marl.oversight import OversightLogger
    from fgmf_marl.oversight.report import build_report
    from fgmf_marl.rollout import rollout
    from test_attribution import make_view
    venv = CoverageVecEnv(CoverageConfig(), n_envs=1, seed=3)
    view = make_view(size=48)
    log = tmp_path / "log"
    with OversightLogger.for_venv(log, view, venv, pgca=PGCA(view, grid=4), attack_name="sign-noise") as logger:
        rollout(view, venv, 1, perturb=sign_noise(8 / 255), step_hook=logger.step_hook)
    ep = load_episode(log / "ep_000000")
    assert ep.arrays["seen_obs"].shape == (40, 3, 3, 48, 48) and "frames" in ep.arrays and "relevance" in ep.arrays
    size = build_report(log, tmp_path / "r.html").stat().st_size
    print(f"report: {size} bytes for 1 episode")
    assert size <= 1_000_000


def test_replay_animation_is_held_to_its_budget_under_heavy_noise() -> None:
    """Stronger noise than the size test's: quality, then frame rate, step down until the WebP fits (and the page says so)."""
    from fgmf_marl.oversight.report import _webp
    frames = list(np.random.default_rng(0).integers(0, 256, (8, 96, 96, 3), dtype=np.uint8))
    src, note = _webp(frames, 4.0, budget=40_000)
    assert len(src) * 3 / 4 <= 40_000 + 100 and "to fit 40 kB" in note
    src, note = _webp(frames[:1] * 8, 4.0, budget=40_000)      # still frames fit at full quality
    assert note == ""
