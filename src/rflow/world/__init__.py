"""rflow's own yardstick: the captioned-shapes world (``shapes``: renderer, grammar, programmatic
judge), rflow-tiny built on it (``tiny``: the embedded model and how to build a fresh one) and the
adherence evaluation of any pipeline on it (``evaluate``). Nothing below this package imports it
except through :mod:`rflow.paths` (the embedded model's folder) and the pipeline's prompt check."""
