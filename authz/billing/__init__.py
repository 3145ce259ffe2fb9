"""Prices, usage rows and the reports built from them."""
