"""segpipe: batch semantic segmentation of large images into chunked Zarr masks.

Importing this package does nothing but define names: no cluster, no logging
configuration, no torch import (the heavy modules are imported where used).
"""

__version__ = "0.1.0"
