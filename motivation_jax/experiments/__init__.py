"""Suites over seeds and arms: runs, statistics, report (``python -m motivation_jax.experiments``).

- ``suite``: the arms of the comparison (base alone, motivated, large alone,
  Experiments A and B), run for each seed as ordinary workdirs of the main job;
- ``stats``: intervals with the seed as the unit, paired differences, the
  loss-drop analysis of the condition's signal;
- ``report``: report.md, report.json and plots.
"""
