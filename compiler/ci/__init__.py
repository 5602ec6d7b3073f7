"""`edgec ci`: a TOML recipe of models x targets, built through `edgec build`, cached, reported for CI systems.

recipe.py reads and checks the recipe, cache.py keys and stores bundles by their inputs, run.py builds one
target (the unit every executor runs), executors.py fans targets out (in-process, local processes, Ray),
report.py writes summary.md, junit.xml and results.json.
"""
