"""The app's screens and dialogs, one screen per module."""
