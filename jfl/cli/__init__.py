"""Console scripts: argument parsing and error reporting around the library."""
