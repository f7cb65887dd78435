"""MME-style evaluation: data sources, scoring, adapters, statistics."""
