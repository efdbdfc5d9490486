"""What a search trains: groups of layers and their masks (groups), how they train (settings),
the strategies that form them (strategies, the registry), and the rules that decide which go on:
successive halving's rungs (halving) and SubTuning's rounds (subtuning)."""
