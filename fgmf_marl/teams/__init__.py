"""Where a team of policies (``agents``) meets its environments (``envs``): the library the jobs call.

The run config (:mod:`.train_config`, with the env and backbone presets in ``presets.yaml``), checkpoint
save and load (:mod:`.checkpoints`), training (:mod:`.training`) and the robustness evaluation: its
config (:mod:`.eval_config`), the grid that runs it (:mod:`.grid`), its cells and worst-case rows
(:mod:`.cells`) and its outputs (:mod:`.report`). It needs both ``agents`` and ``envs``, so it sits
above them in the import floors and below the jobs, which only parse, call it and print
(docs/ARCHITECTURE.md).
"""
