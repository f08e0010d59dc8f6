"""The ``segpipe`` command line."""
