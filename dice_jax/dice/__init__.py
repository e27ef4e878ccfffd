"""The DICE data builder (Algorithm 1, lines 3-5): score, shape, search alpha*, pair, replay."""
