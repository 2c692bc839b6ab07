"""Parallel runtime, below the model: the layout rules (layout.py: rank coordinates, what slice of every
parameter a rank holds, pipeline stages), the layout checks (checks.py), process groups and collectives of
split inference (comm.py), and the training rules: MindSpore sharding (sharding.py) and recompute
(recompute.py). The planner (``dsv3-plan``) is ``mindformers_dsv3.planner``, above the model.

Importing this package imports none of its modules (each is imported where it is used).
"""
