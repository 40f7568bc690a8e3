"""The experiment machinery behind ``scripts/reproduce.py``: an experiment file (:mod:`.schema`) planned into tasks
with cache keys (:mod:`.plan`), a results root used as a cache (:mod:`.cache`), the tasks run on Ray
(:mod:`.runner`) and the tables written from their outputs (:mod:`.tables`).

It knows no job by name: the job layer (``fgmf_marl.jobs.reproduce``) passes the table of jobs
(:class:`.plan.JobInfo`), so this package sits below the jobs in the import floors.
"""
