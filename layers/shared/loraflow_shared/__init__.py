"""loraflow's shared domain: dataset rules, config model, job states, error codes, contracts.

Submodules are imported explicitly (``from loraflow_shared.dataset.config import ...``) so a
function only pays for what it uses at cold start.
"""
