"""specmesh."""
