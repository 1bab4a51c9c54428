"""Training: the one loop (loop.py, with its checkpoint units) and its interface (interface.py:
TrainConfig, TrainHooks, Progress, TrainResult, Diverged), and what it is given to run:
learning-rate schedules and per-parameter rates (schedule.py), penalties on the learned change
(regularize.py), adaptive LoRA ranks (adapt.py) and skipping the frozen bottom layers after the
first epoch (frozen_cache.py)."""
