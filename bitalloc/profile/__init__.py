"""Sensitivity signals measured on calibration data."""
