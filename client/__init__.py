"""The hospital side: ClientApp, hospital data, DP training and privacy accounting."""
