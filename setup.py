"""Kept for tools that still call ``setup.py``; the metadata is in pyproject.toml.

``pip install -e .`` does not run this file's ``develop`` command: pip builds an
editable wheel through setuptools' PEP 660 hook (pyproject.toml, [build-system]).
"""
from setuptools import setup

setup()
