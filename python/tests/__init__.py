"""Tests of the Podflare Python SDK. Run from python/:
PYTHONPATH=. /usr/bin/python3 -m unittest discover -s tests -t . -v"""
