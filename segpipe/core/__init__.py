"""Pure building blocks with no I/O: tiling geometry, the class table, settings, errors."""
