"""The jobs that tie every floor together, each with its command line: train, evaluate, explain,
train the adversary, replay. ``scripts/`` are thin shims over ``<job>.entry``; see docs/ARCHITECTURE.md."""
