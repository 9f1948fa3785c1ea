"""What a person reviews after a run: labelled grids (grids.py), index.html (index.py), both rebuilt from a
manifest or from the PNGs alone (rebuild.py, pngs.py), and two runs compared (diff.py). Each job is shown by its
latest row as batchgen.manifest.latest_rows decides it.

Pure PIL + pandas, never torch, so `batchgen report` runs on machines without a GPU stack. Nothing is
imported here: the planner imports batchgen.axes, and a package import must not pull PIL in with it.
"""
