"""Database layer: the only package that talks SQL."""
