"""The study's recipes, each a config and a run through the engine (no prose)."""
