"""Locustfiles: each module here runs as `locust -f loadtests/scenarios/<name>.py`."""
