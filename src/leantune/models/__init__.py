"""Models and their inputs: loading, pooling, norms, precision, data, chat rendering."""
