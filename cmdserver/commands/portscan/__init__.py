"""portscan."""
