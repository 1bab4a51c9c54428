"""Training: the one loop (loop.py); schedules and regularizers join it later."""
