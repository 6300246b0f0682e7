"""The Textual user interface: it adapts the domain modules to the terminal."""
