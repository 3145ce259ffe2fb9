"""Envoy's bootstrap, rendered from the gateway's configuration, and the Envoy binary."""
