"""segpipe: batch semantic segmentation of large images into chunked Zarr masks.

Importing this package does nothing but define names: no cluster, no logging
configuration, no torch import (the heavy modules are imported where used).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and linters only: the import itself is lazy (below)
    from segpipe.io.xarray import open_output

__version__ = "0.1.0"

__all__ = ["__version__", "open_output"]


def __getattr__(name: str):
    # lazy, so ``import segpipe`` stays free: segpipe.open_output imports fsspec/zarr/xarray on first use
    if name == "open_output":
        from segpipe.io.xarray import open_output

        return open_output
    raise AttributeError(f"module 'segpipe' has no attribute {name!r}")
