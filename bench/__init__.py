"""loraflow benchmarks: ``python -m bench --output bench/results.json`` (``make bench``).

Each benchmark returns result entries ``{name, value, unit, target, notes}``; the runner merges
them into the results file, replacing entries of the same name and keeping all others.
"""
