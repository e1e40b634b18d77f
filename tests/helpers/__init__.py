"""Helpers shared by more than one test file (no tests of the product here; their own tests sit beside them).

Importable as ``helpers`` because tests/conftest.py's folder is on sys.path (pytest's default "prepend"
import mode puts it there).
"""
