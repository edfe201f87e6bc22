"""Transitional re-export: BN-statistics inversion is a calibration source and lives in :mod:`dfquant.data.distill`.

``cli.py`` (``dfq distill``) and ``validate.py`` still import it from here; delete this module, and its entry in
``TRANSITIONAL`` of tests/test_house.py, once they import ``dfquant.data.distill``.
"""

from dfquant.data.distill import METHODS, distill  # noqa: F401
