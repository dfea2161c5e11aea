"""Loaded by pytest before anything else: the notebooks (nbval) run in the small ``smoke`` preset
unless ``MINIPSFT_PRESET`` names another, so the README's test command is the fast one (the full
notebook run is ``MINIPSFT_PRESET=cpu python -m pytest --nbval-lax --nbval-current-env notebooks``).
The kernels nbval starts inherit this environment."""
import os

os.environ.setdefault("MINIPSFT_PRESET", "smoke")
# the tests and the notebooks they run never reach the hub (notebook 06 on a GPU with internet does)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
