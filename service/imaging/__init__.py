"""Series -> Volume (load, sort, QC) and the one shared preprocessing implementation."""
