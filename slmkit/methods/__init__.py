"""One module per seed method; each exposes the algorithm as functions and one workflow function."""
