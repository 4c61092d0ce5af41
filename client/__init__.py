"""The hospital side: ClientApp, site data, DP training and privacy accounting."""
