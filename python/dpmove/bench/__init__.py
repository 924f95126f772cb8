"""Microbenchmarks behind ``dpmove bench``: one aligned row per case, medians, --json."""
