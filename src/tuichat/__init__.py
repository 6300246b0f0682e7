"""tuichat: a terminal chat client and local server manager for LMDeploy."""

__version__ = "0.1.0"
