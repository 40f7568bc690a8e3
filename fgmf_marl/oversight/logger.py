"""``OversightLogger``: records evaluated episodes with PGCA explanations, via the rollout's step hook.

Usage (the one episode loop is :func:`fgmf_marl.rollout.rollout`)::

    with OversightLogger("runs/x/eval/oversight", view, every=1, attack_name="pgd") as log:
        rollout(view, venv, n_episodes, perturb=attack, step_hook=log.step_hook)

All agents of all env copies of a logged step are explained in ONE batched PGCA call (one forward +
backward for the scores and G, then the perturbation copies of every agent together, under
inference mode), and with few env copies several logged steps share a call: steps wait until
``explain_batch`` agent-slots (24) do or an episode ends; the stages are copied to the host and
converted to float16 once per call. Cheap facts (actions, probabilities, values,
rewards, attack facts) are kept for every step; images and explanations for every ``every``-th step
of an episode (``every=1`` logs everything; larger values bound the overhead). An episode is written
(atomically, then chained into the manifest, see :mod:`fgmf_marl.oversight.store`) when it ends, by a
background thread while the evaluation goes on, in the order episodes ended; :meth:`OversightLogger.close`
(and leaving the ``with`` block, also by an exception) returns only when every finished episode is written.
Episodes still running when the logger closes are dropped, as ``rollout`` drops them from its returns.
Only the episodes ``rollout`` counts are logged (``StepRecord.counted``), so a log holds exactly the
episodes whose returns the evaluation reports.

What is explained is the action the agent took, on the observation it saw (attacked or not): the
reviewer's question is "what did the agent look at when it acted". Attack facts per agent-step:
``linf = ||seen - clean||_inf`` and ``flipped`` = greedy action on seen != greedy action on clean.

With an ``alarm`` (a fitted :class:`~fgmf_marl.oversight.alarm.AlarmDetector`) every agent-step also gets the
alarm's score and verdict (``alarm_score``, ``alarm``), from the observation the agent saw only: unlike
``flipped`` and ``linf``, which need the clean observation an evaluation has and a deployment does not, the
alarm is what an overseer watching a live team would see. An episode whose count of alarmed agent-steps exceeds
``episode_alarm_threshold`` raises an episode alarm (``summary["episode_alarm"]``).
"""
from __future__ import annotations

import logging
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fgmf_marl.attribution.metrics import pointing_game, relevance_mass_accuracy
from fgmf_marl.attribution.pgca import PGCA
from fgmf_marl.defenses.sgam import sgam_mask_of
from fgmf_marl.oversight.alarm import AlarmDetector, StepHistory, episode_alarm_threshold
from fgmf_marl.oversight.render import overlay, review_signal
from fgmf_marl.oversight.store import LogWriter
from fgmf_marl.policy import PolicyLike


#: agent-slots explained in one PGCA call (see ``OversightLogger._explain_pending``)
EXPLAIN_BATCH = 24
#: bytes of finished episodes that may wait for the background writer (see ``OversightLogger._write``)
MAX_QUEUED_BYTES = 256 * 2**20
_log = logging.getLogger(__name__)

PER_STEP = ("actions", "clean_actions", "greedy_actions", "probs", "values", "rewards", "linf", "flipped")
PER_LOGGED = ("clean_obs", "seen_obs", "pgca_P", "pgca_G", "pgca_consensus", "pgca_final", "agreement", "topk_iou",
              "evidence", "sgam_mask", "relevance", "frames")


class OversightLogger:
    """Step hook that buffers per-env episodes and writes them to an oversight log directory.

    ``frame_fn() -> (n_envs, h, w, 3)`` (e.g. ``CoverageVecEnv.global_frames``) adds the global frame;
    ``tb_writer`` (a ``SummaryWriter``) gets per-episode scores and the overlay of the least trusted
    step (``render.review_signal``); ``run_info`` is copied into every episode's JSON (checkpoint, config, seed);
    ``action_names`` label actions in replays. ``append`` and ``key`` are :class:`LogWriter`'s: a
    folder holding a log is refused unless ``append``, and a ``key`` adds an HMAC to every record.
    :meth:`close` seals the log and returns its head hash, which the caller keeps elsewhere.
    """

    def __init__(self, log_dir: str | Path, view: PolicyLike, *, every: int = 1, attack_name: str | None = None,
                 pgca: PGCA | None = None,
                 frame_fn: Callable[[], np.ndarray] | None = None, tb_writer: Any = None,
                 run_info: dict[str, Any] | None = None, action_names: Sequence[str] | None = None,
                 append: bool = False, key: bytes | None = None, explain_batch: int = EXPLAIN_BATCH,
                 alarm: AlarmDetector | None = None) -> None:
        if every < 1:
            raise ValueError(f"log every must be >= 1 step, got {every}")
        if explain_batch < 1:
            raise ValueError(f"explain_batch must be >= 1 agent-slot, got {explain_batch}")
        self.writer = LogWriter(log_dir, append=append, key=key)
        self.view, self.every, self.attack_name = view, every, attack_name
        self.frame_fn, self.tb = frame_fn, tb_writer
        self.pgca = pgca or PGCA(view)
        self.run_info = run_info or {}
        self.action_names = list(action_names) if action_names is not None else None
        self._buf: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.explain_batch = explain_batch
        self._pending: list[tuple[int, Tensor, Tensor]] = []   # (env, observations seen, actions) of logged steps
        self._last_frames: np.ndarray | None = None
        self.alarm = alarm
        self._alarm_history = StepHistory()          # every slot's previous step, what the alarm compares with
        self.written: list[dict[str, Any]] = []
        self._writer_thread: ThreadPoolExecutor | None = None
        self._queued: deque[tuple[Future, int]] = deque()   # (episode write, its arrays' bytes), oldest first
        self._write_error: BaseException | None = None      # the first failed write's

    @classmethod
    def for_venv(cls, log_dir: str | Path, view: PolicyLike, venv: Any, **kwargs: Any) -> "OversightLogger":
        """A logger set up for ``venv``: an env that offers them adds its global frames and action names.

        A VecEnv may expose ``global_frames() -> (n_envs, h, w, 3)`` and ``action_names`` (the native
        env does); the logger asks for them by name so that it never imports an environment.
        This is what ``--log-explanations DIR`` in ``evaluate.py`` / ``train_marl.py`` calls::

            log = OversightLogger.for_venv(DIR, view, venv, every=k, attack_name=...)
            rollout(view, venv, n, perturb=..., step_hook=log.step_hook); log.close()
        """
        if callable(getattr(venv, "global_frames", None)):
            kwargs.setdefault("frame_fn", venv.global_frames)
        if getattr(venv, "action_names", None) is not None:
            kwargs.setdefault("action_names", tuple(venv.action_names))
        return cls(log_dir, view, **kwargs)

    # ------------------------------------------------------------------ hook
    def step_hook(self, record: Any) -> None:
        """Pass as ``rollout(..., step_hook=logger.step_hook)``."""
        n = record.n_agents
        n_envs = len(record.t)
        active = [b for b in range(n_envs) if record.counted[b]]
        if not active:
            return
        seen, clean = record.seen_obs.detach(), record.clean_obs.detach()
        attacked = seen is not clean
        greedy = record.probs.argmax(dim=-1).cpu().numpy()
        linf = ((seen - clean).abs().flatten(1).amax(dim=1).cpu().numpy() if attacked
                else np.zeros(seen.shape[0], dtype=np.float32))
        logged = [b for b in active if record.t[b] % self.every == 0]
        logged_pos = {b: j for j, b in enumerate(logged)}
        slots = np.array([b * n + a for b in logged for a in range(n)], dtype=int)
        frames = None
        if len(slots):
            index = torch.as_tensor(slots, device=seen.device)
            obs, actions = seen[index], torch.as_tensor(record.actions[slots], device=seen.device)
            # converted by torch, then copied: bit-identical to numpy's astype(float16) / rint, several times faster
            seen16 = obs.half().cpu().numpy()
            clean8 = (clean[index.to(clean.device)] * 255).round().to(torch.uint8).cpu().numpy()
        if self.frame_fn is not None:
            # The hook runs after the step: the frame before step t is the one seen after step t-1
            # (after an episode's last step the env has auto-reset, which is the next episode's
            # first state). Only the rollout's very first step falls back to the post-step frame.
            after = np.asarray(self.frame_fn())
            frames = after if self._last_frames is None else self._last_frames
            self._last_frames = after
        probs = record.probs.detach().cpu().numpy()
        values = record.values.detach().cpu().numpy()
        alarm_score = self._alarm_scores(record) if self.alarm is not None else None
        ended = []
        for b in active:
            sl = slice(b * n, (b + 1) * n)
            buf = self._buf[b]
            buf["t"].append(int(record.t[b]))
            for key, arr in (("actions", record.actions), ("clean_actions", record.clean_actions),
                             ("greedy_actions", greedy), ("probs", probs), ("values", values),
                             ("rewards", record.rewards), ("linf", linf)):
                buf[key].append(np.asarray(arr[sl]))
            buf["flipped"].append(greedy[sl] != np.asarray(record.clean_actions[sl]))
            if alarm_score is not None:
                buf["alarm_score"].append(alarm_score[sl])
            if b in logged_pos:
                j = logged_pos[b]
                rows = slice(j * n, (j + 1) * n)
                buf["logged_t"].append(int(record.t[b]))
                buf["clean_obs"].append(clean8[rows])
                buf["seen_obs"].append(seen16[rows])
                self._pending.append((b, obs[rows], actions[rows]))
                if record.relevance is not None:
                    buf["relevance"].append(np.asarray(record.relevance[sl]).astype(bool))
                if frames is not None:
                    buf["frames"].append(frames[b] if frames.ndim == 4 else frames)
            if np.asarray(record.dones[sl]).all():
                ended.append(b)
        if ended or sum(waiting.shape[0] for _, waiting, _ in self._pending) >= self.explain_batch:
            self._explain_pending()
        for b in ended:
            self._write(b, int(record.episode[b]), n)

    def _alarm_scores(self, record: Any) -> np.ndarray:
        """The alarm's score of every slot of this step (features of the observation seen, the action distribution
        and the frame moved since the slot's previous step; none at an episode's first step)."""
        features = self._alarm_history.features(self.view, record.seen_obs, record.probs,
                                                np.repeat(np.asarray(record.t) == 0, record.n_agents))
        return self.alarm.score(features.cpu().numpy())

    def _explain_pending(self) -> None:
        """Explain every logged step still waiting, in ONE batched PGCA call, and file the stages per env.

        Why wait: PGCA's cost per image roughly halves from one step of 3 agents to ~24 agent-slots
        (per-call overhead) and is flat above, so an evaluation of few env copies batches across steps
        (docs/experiments/oversight-log-cost.md, "logging cost with local ablations"); the maps are those
        of one call per step (tested)."""
        if not self._pending:
            return
        obs = torch.cat([o for _, o, _ in self._pending])
        expl = self.pgca.explain(obs, torch.cat([a for _, _, a in self._pending]))
        mask = sgam_mask_of(self.view, obs)
        # one dtype conversion (by torch, as in step_hook) and one device->host copy per batch, sliced per step below
        stages = {key: val.half().cpu().numpy() for key, val in
                  (("pgca_P", expl.P), ("pgca_G", expl.G), ("pgca_consensus", expl.consensus),
                   ("pgca_final", expl.final))}
        mask16 = mask.half().cpu().numpy() if mask is not None else None
        stages.update((key, getattr(expl, key).cpu().numpy()) for key in ("agreement", "topk_iou", "evidence"))
        start = 0
        for b, o, _ in self._pending:
            rows = slice(start, start + o.shape[0])
            start += o.shape[0]
            buf = self._buf[b]
            for key, val in stages.items():
                buf[key].append(val[rows])
            if mask16 is not None:
                buf["sgam_mask"].append(mask16[rows])
        self._pending.clear()

    # ------------------------------------------------------------------ episode
    def _write(self, env: int, episode_in_env: int, n_agents: int) -> None:
        """Hand env ``env``'s finished episode to the background writer (one thread, so episodes are written
        and chained in the order they ended).

        Why a thread: compressing, hashing and fsyncing an episode release the GIL, so the evaluation goes on
        meanwhile. At most ``MAX_QUEUED_BYTES`` of episodes wait (else this waits for the oldest); a write that
        failed is raised here, at the next episode, or by :meth:`close`, and no later episode is written."""
        buf = self._buf.pop(env)
        size = sum(a.nbytes for values in buf.values() for a in values if isinstance(a, np.ndarray))
        self._collect_writes(keep_bytes=MAX_QUEUED_BYTES - size)
        if self._writer_thread is None:
            self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oversight-log")
        self._queued.append((self._writer_thread.submit(self._write_episode, buf, env, episode_in_env, n_agents), size))

    def _collect_writes(self, keep_bytes: int = 0) -> None:
        """Wait for queued episode writes, oldest first, until at most ``keep_bytes`` of them wait (0: all
        finished); raise the first failed write's error."""
        while self._queued and (self._queued[0][0].done() or sum(size for _, size in self._queued) > keep_bytes):
            future, _ = self._queued.popleft()
            future.result()

    def _write_episode(self, buf: dict[str, list], env: int, episode_in_env: int, n_agents: int) -> None:
        """Build one episode's arrays, records and summary from its buffer and append it to the log (the
        background writer's task; after a failed write it writes nothing, so the log ends where it failed)."""
        if self._write_error is not None:
            return
        try:
            self._append_episode(buf, env, episode_in_env, n_agents)
        except BaseException as exc:
            self._write_error = exc
            raise

    def _append_episode(self, buf: dict[str, list], env: int, episode_in_env: int, n_agents: int) -> None:
        """One episode's arrays (the format's dtypes), per agent-step records and summary, appended to the log."""
        arrays: dict[str, np.ndarray] = {}
        for key in PER_STEP:
            arrays[key] = np.stack(buf[key])
        for key in PER_LOGGED:
            if buf.get(key):
                arrays[key] = np.stack(buf[key])
        arrays["logged_t"] = np.asarray(buf["logged_t"], dtype=np.int64)
        if buf.get("alarm_score"):
            arrays["alarm_score"] = np.stack(buf["alarm_score"]).astype(np.float32)
            arrays["alarm"] = arrays["alarm_score"] > self.alarm.threshold
        arrays["actions"] = arrays["actions"].astype(np.int64)
        arrays["clean_actions"] = arrays["clean_actions"].astype(np.int64)
        for key in ("probs", "values", "rewards", "linf", "agreement", "topk_iou", "evidence"):
            if key in arrays:
                arrays[key] = arrays[key].astype(np.float32)
        rewards = arrays["rewards"]
        summary: dict[str, Any] = {
            "steps": int(rewards.shape[0]), "logged_steps": int(len(arrays["logged_t"])),
            "team_return": float(rewards.mean(axis=1).sum()),
            "agent_returns": rewards.sum(axis=0).tolist(),
            "flip_rate": float(arrays["flipped"].mean()),
            "attacked_fraction": float((arrays["linf"] > 0).mean()),
            "mean_linf_255": float(arrays["linf"].mean() * 255),
            "max_linf_255": float(arrays["linf"].max() * 255),
        }
        if "alarm" in arrays:
            alarmed = np.flatnonzero(arrays["alarm"].any(axis=1))
            limit = episode_alarm_threshold(int(arrays["alarm"].size), self.alarm.false_alarm_rate)
            summary.update(alarms=int(arrays["alarm"].sum()), alarm_rate=float(arrays["alarm"].mean()),
                           first_alarm_t=int(alarmed[0]) if len(alarmed) else None,
                           episode_alarm=bool(arrays["alarm"].sum() > limit))
        if "agreement" in arrays:
            summary.update(mean_agreement=float(arrays["agreement"].mean()),
                           min_agreement=float(arrays["agreement"].min()),
                           mean_topk_iou=float(arrays["topk_iou"].mean()))
        if "evidence" in arrays and np.isfinite(arrays["evidence"]).any():
            summary.update(min_evidence=float(np.nanmin(arrays["evidence"])))
        if "relevance" in arrays:
            h, w = arrays["relevance"].shape[-2:]
            final = torch.from_numpy(arrays["pgca_final"].astype(np.float32)).reshape(-1, h, w)
            rel = torch.from_numpy(arrays["relevance"]).reshape(-1, h, w)
            for key, metric in (("relevance_mass_accuracy", relevance_mass_accuracy), ("pointing_game", pointing_game)):
                scores = metric(final, rel).numpy()
                if np.isfinite(scores).any():   # none where no step had both a map and an entity (a blacked-out view)
                    summary[key] = float(np.nanmean(scores))
        records = []
        logged_index = {t: i for i, t in enumerate(arrays["logged_t"].tolist())}
        for i, t in enumerate(buf["t"]):
            for a in range(n_agents):
                rec = {"t": t, "agent": a, "action": int(arrays["actions"][i, a]),
                       "clean_action": int(arrays["clean_actions"][i, a]),
                       "prob": float(arrays["probs"][i, a, arrays["actions"][i, a]]),
                       "value": float(arrays["values"][i, a]), "reward": float(rewards[i, a]),
                       "linf_255": float(arrays["linf"][i, a] * 255), "flipped": bool(arrays["flipped"][i, a]),
                       "logged": t in logged_index}
                if "alarm" in arrays:
                    rec.update(alarm_score=float(arrays["alarm_score"][i, a]), alarm=bool(arrays["alarm"][i, a]))
                if t in logged_index and "agreement" in arrays:
                    rec["agreement"] = float(arrays["agreement"][logged_index[t], a])
                if t in logged_index and "evidence" in arrays:
                    rec["evidence"] = float(arrays["evidence"][logged_index[t], a])
                records.append(rec)
        meta = {"env_index": env, "episode_in_env": episode_in_env, "n_agents": n_agents,
                "attack": self.attack_name, "every": self.every, "action_names": self.action_names,
                "pgca": self.pgca.settings(),
                "alarm": None if self.alarm is None else {"threshold": self.alarm.threshold,
                                                          "false_alarm_rate": self.alarm.false_alarm_rate},
                "run": self.run_info, "summary": summary, "records": records}
        entry = self.writer.append(arrays, meta)
        self.written.append(entry)
        if self.tb is not None:
            self._tensorboard(entry["index"], arrays, summary)

    def _tensorboard(self, index: int, arrays: dict[str, np.ndarray], summary: dict[str, Any]) -> None:
        for key in ("team_return", "flip_rate", "mean_agreement", "relevance_mass_accuracy"):
            if key in summary:
                self.tb.add_scalar(f"oversight/{key}", summary[key], index)
        signal = review_signal(arrays)
        if "pgca_final" in arrays and signal is not None:
            j = int(np.argmin(signal[1].min(axis=1)))  # the step a reviewer should see first
            tiles = [overlay(arrays["seen_obs"][j, a].astype(np.float32), arrays["pgca_final"][j, a].astype(np.float32))
                     for a in range(arrays["seen_obs"].shape[1])]
            self.tb.add_image("oversight/least_trusted_step", np.concatenate(tiles, axis=1), index, dataformats="HWC")
        self.tb.flush()

    def close(self) -> str:
        """Drop unfinished episodes (as ``rollout`` does), wait until every finished one is written, seal the
        log and return its head hash; a failed write is raised here and the log is left unsealed.

        Call it only when the episodes ran to the end: a log left unsealed is what an interrupted
        run looks like to ``replay.py verify``.
        """
        self._buf.clear()
        self._pending.clear()
        try:
            self._collect_writes()
        finally:
            self._stop_writer()
        if self._write_error is not None:   # raised again by a second close: the log must stay unsealed
            raise self._write_error
        return self.writer.close()

    def _stop_writer(self) -> None:
        """Wait for every queued write (finished, failed or skipped) and end the writer thread."""
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=True)
            self._writer_thread = None

    def summary(self, head: str) -> dict[str, Any]:
        """What a run records about its log: where it is, its head hash and its episode count."""
        return {"dir": str(self.writer.dir), "head": head, "episodes": self.writer.n_episodes}

    def __enter__(self) -> "OversightLogger":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, *_: object) -> None:
        """Seal on a clean exit; after an exception the episodes that ended are still written (a write that
        failed meanwhile is logged, not raised over the exception) and the log stays unsealed, as an
        interrupted run's."""
        if exc_type is None:
            self.close()
        else:
            self._buf.clear()
            self._pending.clear()
            self._stop_writer()
            self._queued.clear()
            if self._write_error is not None and self._write_error is not exc:
                _log.warning("oversight log %s: an episode was not written: %s", self.writer.dir, self._write_error)
