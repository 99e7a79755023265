"""Adds this package's presets to Hydra's search path: installed means visible, no flag needed."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class TeamPresetsSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="team-presets", path="pkg://team_presets.conf")
