"""Our team's presets for ddp-adapters: conf/preset/*.yaml, found through hydra_plugins/team_presets_searchpath."""
