"""Emulated ESP32 boards: stand-in modules, flash, and the device models behind them."""
