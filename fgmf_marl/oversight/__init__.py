"""The oversight log: per-episode records of what every agent saw, did and looked at, tamper-evident.

See :mod:`fgmf_marl.oversight.store` for the on-disk format, :class:`OversightLogger` for recording
through the rollout's step hook, and ``scripts/replay.py`` for ``verify``, ``render`` and ``report``.
"""
from fgmf_marl.oversight.logger import OversightLogger
from fgmf_marl.oversight.store import (FORMAT, Episode, LogWriter, VerifyResult, list_episodes,
                                       load_episode, read_manifest, verify)

__all__ = ["FORMAT", "Episode", "LogWriter", "OversightLogger", "VerifyResult", "list_episodes", "load_episode",
           "read_manifest", "verify"]
