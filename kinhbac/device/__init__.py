"""The technician's tools: flash a board, copy the node's files, register it with the fleet.

Runs on a laptop with the `device` extra only: it talks to the fleet over HTTP and never
imports the fleet service (`kinhbac.fleet`), so the laptop needs neither FastAPI nor a database.
"""

# Where the commands find the fleet when no option says: the environment.
FLEET_URL_ENV = "KINHBAC_FLEET_URL"
FLEET_TOKEN_ENV = "KINHBAC_FLEET_TOKEN"
