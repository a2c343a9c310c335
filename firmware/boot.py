# This file is executed on every boot (including wake-boot from deepsleep).
# Kinhbac keeps it empty: the app starts from main.py, after MicroPython's own set-up.
