from django.apps import AppConfig


class NoopPluginsConfig(AppConfig):
    """Holds the benchmark's component; bamboo-pipeline discovers `components.collections` in every app."""

    name = "noop_plugins"
