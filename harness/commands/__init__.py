"""One module per CLI command that does more than parse and print: run, inspect, trace."""
