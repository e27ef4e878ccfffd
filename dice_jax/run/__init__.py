"""The DICE run: configuration, run folder and stages, the round loop (Algorithm 1)."""
