"""Test helpers built in code: the test CA (`ca.py`) and other helpers' support modules."""
