"""Verb groups of the `carbonscale` CLI; each module defines `register(subparsers)`."""
