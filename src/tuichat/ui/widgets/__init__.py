"""The app's widgets: the chat pieces and the status pane."""
