"""The REST API, one router per area; each route names the roles that may call it."""
