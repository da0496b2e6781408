"""Adapters for agent frameworks. Each module imports its framework lazily: importing
``podflare.integrations.<name>`` never requires the framework to be installed."""
