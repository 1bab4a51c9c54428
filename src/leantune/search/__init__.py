"""Many runs: compare, sweep, shared studies and their workers, and their pages."""
