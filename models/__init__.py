"""Model recipes and builders: the tiny seeded test model and the full-size SD 1.5 architecture."""
