"""I/O: image readers behind one interface, and fsspec storage helpers.

Only modules under ``segpipe.io``, ``segpipe.io.output`` and ``segpipe.export`` touch
files, buckets and Zarr.
"""
