"""The training engine: `engine.fit.fit` trains any model in a run folder, resumable.

config (what is hashed), order (the callbacks' one order), metrics, schedule, fastpath,
resume, callbacks, fit, runs (run folders, written by data/files.py's one atomic writer),
inference."""
