"""File formats at the bottom of the package: atomic writes, the checkpoint file, results.json.

Nothing here imports the rest of the package but :mod:`transformer_mt.errors`.
"""
