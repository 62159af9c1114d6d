"""ACPI tables built from a machine's shape (tables.py) and the AML builder for the DSDT (aml.py)."""

from . import aml
from .tables import TABLES_ADDR, TABLES_END, AcpiTables, Device, build, standard_devices

__all__ = ["TABLES_ADDR", "TABLES_END", "AcpiTables", "Device", "aml", "build", "standard_devices"]
