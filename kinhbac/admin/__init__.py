"""The admin's commands: releases (`kinhbac release`) and rollouts (`kinhbac rollout`), over the
fleet's API.

Talks to the fleet over HTTP with an admin's API token and never imports the fleet service
(`kinhbac.fleet`), so it runs on any machine with the `admin` extra (httpx).
"""
