"""What to tune and what was kept: select, plan, probe, knowledge, evaluate, generate."""
