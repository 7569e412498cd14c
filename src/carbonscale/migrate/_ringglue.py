"""The ring helpers a migration borrows from the `carbonscale ring` command, in one
place: when they move into the library, only these imports change."""

from carbonscale.commands.ring import Locator, join_lines, make_ring, read_names

__all__ = ["Locator", "join_lines", "make_ring", "read_names"]
