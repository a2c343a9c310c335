"""The fleet service: the device registry, provisioning, users and roles, behind a REST API."""
