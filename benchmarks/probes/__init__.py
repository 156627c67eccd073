"""One-off probes: each takes one cost of the experts op apart, for a NOTES.md section (index: README.md).
Run from the repository root as modules, e.g. `python -m benchmarks.probes.probe_padding --help`.
"""
