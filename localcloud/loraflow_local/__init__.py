"""loraflow's embedded local cloud: the real template, ASL, handlers and containers on moto."""
