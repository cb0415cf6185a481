"""A deliberately broken backend plugin: importing it fails."""

raise ImportError("lse_toy_broken is broken on purpose")
