"""Loaded by pytest before anything else: the notebooks (nbval) run in the small ``smoke`` preset
unless ``MINIPSFT_PRESET`` names another, so the README's test command is the fast one (the full
notebook run is ``MINIPSFT_PRESET=cpu python -m pytest --nbval-lax --nbval-current-env notebooks``).
The kernels nbval starts inherit this environment."""
import os

os.environ.setdefault("MINIPSFT_PRESET", "smoke")
