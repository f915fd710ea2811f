"""Models with pluggable sparse attention."""
