"""Helper scripts run by hand or by make (python -m tools.NAME); the pipeline never imports them."""
